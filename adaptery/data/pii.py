"""Finding and redacting personal data and secrets in records.

Each finding becomes a typed placeholder (`[EMAIL]`, `[PHONE]`, …) so the text still reads as a
sentence. Detectors run in an order that lets the most specific claim text first: secrets and
URLs, emails, IP addresses, national ids, then runs of digits, which are classified as a whole
(a Luhn-valid 13–19 digit run is a card; a formatted 9–12 digit run or a `+` number is a phone),
so a card is never half-eaten by the phone rule and dates, years and order numbers stay.

National-id-like numbers: US SSNs (`ddd-dd-dddd`, impossible ranges excluded), UK National
Insurance numbers, and any value labelled as an id (`passport no. X123…`, `national id: …`,
`ID number …`, `SSN …`, `personnummer …`).
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

KINDS = ("email", "phone", "ip_address", "card_number", "national_id", "url_credentials")
PLACEHOLDERS = {
    "email": "[EMAIL]",
    "phone": "[PHONE]",
    "ip_address": "[IP_ADDRESS]",
    "card_number": "[CARD_NUMBER]",
    "national_id": "[NATIONAL_ID]",
    "url_credentials": "[SECRET_URL]",
}

_URL_END = r"[^\s,;)\]]*"  # a URL ends before whitespace or the punctuation around it
_URL_WITH_USER = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s/@:]+:[^\s/@]+@" + _URL_END, re.I)
_URL_WITH_TOKEN = re.compile(
    r"\bhttps?://[^\s?#]+\?\S*?\b(?:token|access_token|api_key|apikey|key|sig|signature|password|passwd|secret|"
    r"auth|client_secret)=[^&\s,;)\]]+" + _URL_END,
    re.I,
)
_SECRET = re.compile(r"\b(?:AKIA[0-9A-Z]{16}|sk-[A-Za-z0-9_-]{20,}|gh[pousr]_[A-Za-z0-9]{36,}|xox[abprs]-[\w-]{10,})\b")
_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_IPV4 = re.compile(
    r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w.])"
)
_IPV6_CANDIDATE = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_SSN = re.compile(r"(?<![\w-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\w-])")
_UK_NI = re.compile(r"\b(?!BG|GB|KN|NK|NT|TN|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b")
_LABELLED_ID = re.compile(
    r"\b(?P<label>passport(?: number| no\.?)?|national id(?: number)?|id number|identity number|ssn|"
    r"personnummer|tax id)\s*[:#=]?\s*(?P<value>[A-Z0-9][A-Z0-9-]{5,17})\b",
    re.I,
)
_NUMBER_RUN = re.compile(r"(?<![\w+.-])\+?\(?\d[\d ().-]{5,}\d(?![\w])")
_DATE = re.compile(r"^\d{4}[-/.]\d{1,2}[-/.]\d{1,2}$|^\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}$")


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, char in enumerate(reversed(digits)):
        n = int(char)
        if i % 2 == 1:
            n = n * 2 - 9 if n > 4 else n * 2
        total += n
    return total % 10 == 0


def _classify_number(run: str) -> str | None:
    digits = re.sub(r"\D", "", run)
    if _DATE.match(run.strip()):
        return None
    if 13 <= len(digits) <= 19 and luhn_valid(digits) and re.fullmatch(r"[\d -]+", run):
        return "card_number"
    if re.fullmatch(r"\d{3}-\d{2}-\d{4}", run):
        return None  # SSN-shaped but not a valid SSN: not a phone number either
    separators = len(re.findall(r"[ ().-]+", run.strip("+")))
    if run.startswith("+") and 8 <= len(digits) <= 15:
        return "phone"
    if 9 <= len(digits) <= 12 and ("(" in run or separators >= 2):
        return "phone"
    return None


def _ipv6(match: re.Match) -> bool:
    try:
        ipaddress.IPv6Address(match.group(0))
    except ValueError:
        return False
    return True


def scrub_text(text: str, kinds: Iterable[str] = KINDS) -> tuple[str, Counter]:
    """`text` with every finding of `kinds` replaced by its placeholder, and the counts per kind."""
    wanted = check_kinds(kinds)
    counts: Counter = Counter()

    def sub(
        pattern: re.Pattern,
        kind: str,
        text: str,
        accept: Callable[[re.Match], bool] | None = None,
        placeholder: str | None = None,
    ) -> str:
        def replace(match: re.Match) -> str:
            if accept is not None and not accept(match):
                return match.group(0)
            counts[kind] += 1
            return placeholder or PLACEHOLDERS[kind]

        return pattern.sub(replace, text)

    if "url_credentials" in wanted:
        text = sub(_URL_WITH_USER, "url_credentials", text)
        text = sub(_URL_WITH_TOKEN, "url_credentials", text)
        text = sub(_SECRET, "url_credentials", text, placeholder="[SECRET]")
    if "email" in wanted:
        text = sub(_EMAIL, "email", text)
    if "ip_address" in wanted:
        text = sub(_IPV4, "ip_address", text)
        text = sub(_IPV6_CANDIDATE, "ip_address", text, accept=_ipv6)
    if "national_id" in wanted:
        text = sub(_SSN, "national_id", text)
        text = sub(_UK_NI, "national_id", text)

        def labelled(match: re.Match) -> str:
            counts["national_id"] += 1
            return f"{match.group('label')} {PLACEHOLDERS['national_id']}"

        text = _LABELLED_ID.sub(labelled, text)
    if "card_number" in wanted or "phone" in wanted:

        def number(match: re.Match) -> str:
            kind = _classify_number(match.group(0))
            if kind is None or kind not in wanted:
                return match.group(0)
            counts[kind] += 1
            return PLACEHOLDERS[kind]

        text = _NUMBER_RUN.sub(number, text)
    return text, counts


def check_kinds(kinds: Iterable[str]) -> set[str]:
    wanted = set(kinds)
    unknown = wanted - set(KINDS)
    if unknown:
        raise ValueError(f"unknown PII kind(s) {', '.join(sorted(unknown))}; known: {', '.join(KINDS)}")
    return wanted


def scrub_record(record: dict[str, Any], kinds: Iterable[str] = KINDS) -> tuple[dict[str, Any], Counter]:
    counts: Counter = Counter()
    messages = []
    for message in record["messages"]:
        content, found = scrub_text(message["content"], kinds)
        counts.update(found)
        messages.append({**message, "content": content})
    return {**record, "messages": messages}, counts


@dataclass
class PiiReport:
    kinds: list[str]
    records_total: int = 0
    records_changed: int = 0
    counts_by_kind: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kinds": self.kinds,
            "records_total": self.records_total,
            "records_changed": self.records_changed,
            "counts_by_kind": {kind: self.counts_by_kind.get(kind, 0) for kind in self.kinds},
        }


def scrub(
    records: Iterable[dict[str, Any]], kinds: Iterable[str] = KINDS, progress: Callable[[int], None] | None = None
) -> tuple[Iterator[dict[str, Any]], PiiReport]:
    """Redacted records as a stream; the report is complete once the stream is consumed."""
    kinds = [k for k in KINDS if k in check_kinds(kinds)]
    report = PiiReport(kinds=kinds)

    def stream() -> Iterator[dict[str, Any]]:
        for record in records:
            cleaned, counts = scrub_record(record, kinds)
            report.records_total += 1
            if counts:
                report.records_changed += 1
                report.counts_by_kind.update(counts)
            if progress is not None and report.records_total % 1000 == 0:
                progress(report.records_total)
            yield cleaned

    return stream(), report
