"""OpenAI chat-format JSONL: reading and validating it, line by line.

Every problem in the file is reported with its line number and field, so a person can fix the
file in one pass instead of one error at a time.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from adaptery.data.untrusted import LineTooLong, RecordLimits, UntrustedJSONError, loads

ROLES = ("system", "user", "assistant")
MAX_REPORTED_ERRORS = 50


@dataclass(frozen=True)
class LineError:
    line: int
    field: str
    message: str
    unit: str = "line"  # "record" where the file has no lines to point at (a JSON array)

    def __str__(self) -> str:
        where = f"{self.unit} {self.line}" + (f": {self.field}" if self.field else "")
        return f"{where}: {self.message}"

    def to_dict(self) -> dict[str, object]:
        return {"line": self.line, "unit": self.unit, "field": self.field, "message": self.message}


@dataclass
class ChatFileReport:
    records: int = 0
    errors: list[LineError] = field(default_factory=list)
    error_count: int = 0

    @property
    def ok(self) -> bool:
        return self.error_count == 0 and self.records > 0

    def summary(self) -> str:
        if self.records == 0 and self.error_count == 0:
            return "the file has no records: expected one JSON object per line with a 'messages' list"
        shown = "; ".join(str(e) for e in self.errors[:5])
        more = f" (and {self.error_count - 5} more)" if self.error_count > 5 else ""
        return f"{self.error_count} invalid line(s) of {self.records + self.error_count}: {shown}{more}"


def _message_errors(line: int, index: int, message: object) -> list[LineError]:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        return [LineError(line, where, "must be an object with 'role' and 'content'")]
    errors = []
    role = message.get("role")
    if role not in ROLES:
        errors.append(LineError(line, f"{where}.role", f"unknown role {role!r} (expected system, user or assistant)"))
    content = message.get("content")
    if not isinstance(content, str):
        errors.append(LineError(line, f"{where}.content", "must be a string"))
    elif not content.strip():
        errors.append(LineError(line, f"{where}.content", "is empty"))
    weight = message.get("weight")
    if weight is not None and weight not in (0, 1):
        errors.append(LineError(line, f"{where}.weight", "must be 0 or 1"))
    return errors


def record_errors(line: int, record: object) -> list[LineError]:
    if not isinstance(record, dict):
        return [LineError(line, "", "each line must be a JSON object")]
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        return [LineError(line, "messages", "must be a non-empty list of messages")]
    errors = [e for i, m in enumerate(messages) for e in _message_errors(line, i, m)]
    if not errors and not any(m.get("role") == "assistant" for m in messages):
        errors.append(LineError(line, "messages", "has no assistant message to learn from"))
    return errors


def validate_lines(lines: Iterable[bytes | LineTooLong], limits: RecordLimits) -> ChatFileReport:
    """Check every line (from `untrusted.bounded_lines`); keep the first MAX_REPORTED_ERRORS errors and
    count them all. A line over `limits` is an invalid line like any other."""
    report = ChatFileReport()
    for number, raw in enumerate(lines, start=1):
        if isinstance(raw, LineTooLong):
            problems = [LineError(number, "", limits.too_large(raw.size))]
        elif not raw.strip():
            continue
        else:
            try:
                problems = record_errors(number, loads(raw.rstrip(b"\r\n"), max_depth=limits.max_depth))
            except UntrustedJSONError as exc:
                problems = [LineError(number, "", str(exc))]
        if problems:
            report.error_count += 1
            room = MAX_REPORTED_ERRORS - len(report.errors)
            report.errors.extend(problems[: max(room, 0)])
        else:
            report.records += 1
    return report
