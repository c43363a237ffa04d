"""Finding and redacting personal data and secrets in chat records.

Each finding becomes a typed marker (`[EMAIL]`, `[PHONE]`, …) so the text still reads as a
sentence. Detectors run from the most specific to the least, each on the text the previous ones
left (markers hold no digits, so nothing matches twice):

1. `url_credentials`: URLs with a password (`https://user:pass@host`) or a secret-looking query or
   fragment parameter (`token=`, `access_token=`, `api_key=`, `key=`, `sig=`, `password=`, …), as
   `[SECRET_URL]`; then bare secrets in text (AWS `AKIA…`/`ASIA…` key ids, `sk-…`, Stripe `sk_live_…`,
   GitHub `ghp_…`/`github_pat_…`, Slack `xox…-`, Google `AIza…`, JSON Web Tokens, PEM private keys), as
   `[SECRET]`.
2. `email`.
3. `ip_address`: IPv4 with valid octets, IPv6 that `ipaddress` accepts (and that has a digit, so
   C++'s `a::b` stays).
4. `national_id`: US SSNs `ddd-dd-dddd` outside the never-issued ranges (area 000, 666, 900–999,
   group 00, serial 0000); UK National Insurance numbers (`AB 12 34 56 C`, with the prefixes HMRC
   never allocates excluded); and, the generic rule, any number of 5+ digits (optionally with up to
   three leading letters, inner spaces, dots or dashes, one trailing letter) right after an identity
   label: passport, national/identity card number, ID number, social security number, SSN, tax id,
   driver's licence, personnummer, Aadhaar, DNI, NIF, CPF, BSN, PESEL, NRIC. The label stays.
5. `card_number`: 13–19 digits, optionally grouped by single spaces or dashes, starting 2–6 (the
   payment networks' ranges) and passing the Luhn check. Before phones, so a card is never half a
   phone number.
6. `phone`: `+` and a country code with 8–15 digits in all; North American `(415) 555-0132`,
   `415-555-0132`, `415.555.0132`; and national numbers with a trunk `0` and at least one separator
   (`020 7946 0958`, `07700 900123`, `01 23 45 67 89`), 9–12 digits. Digits without a `+`, a trunk
   prefix or separators are left alone: years, dates, versions, times, amounts and order numbers.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, urlsplit

from adaptery.data.chat import PREFERENCE_PARTS, conversations_of, is_preference

KINDS = ("email", "phone", "ip_address", "card_number", "national_id", "url_credentials")
MARKERS = {
    "email": "[EMAIL]",
    "phone": "[PHONE]",
    "ip_address": "[IP_ADDRESS]",
    "card_number": "[CARD_NUMBER]",
    "national_id": "[NATIONAL_ID]",
    "url_credentials": "[SECRET_URL]",
}
SECRET_MARKER = "[SECRET]"
MAX_EXAMPLES_PER_KIND = 3
EXAMPLE_CONTEXT = 30  # characters of redacted text kept on each side of an example's marker

SECRET_PARAMETERS = frozenset(
    {
        "token",
        "access_token",
        "refresh_token",
        "id_token",
        "auth",
        "auth_token",
        "api_key",
        "apikey",
        "api-key",
        "key",
        "sig",
        "signature",
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
        "x-goog-signature",
        "x-goog-credential",
        "password",
        "passwd",
        "pwd",
        "secret",
        "client_secret",
    }
)

_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s<>\"'`]*[^\s<>\"'`.,;:!?)\]}]", re.I)
_SECRET = re.compile(
    r"\b(?:(?:AKIA|ASIA)[0-9A-Z]{16}"
    r"|sk-[A-Za-z0-9_-]{20,}"
    r"|[sr]k_(?:live|test)_[A-Za-z0-9]{16,}"
    r"|gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,}"
    r"|xox[abprs]-[A-Za-z0-9-]{10,}"
    r"|AIza[0-9A-Za-z_-]{35}"
    r"|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"
    r")(?![A-Za-z0-9_-])"
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----",
    re.S,
)
_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,}\b"
)
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|\d{1,3}(?:\.\d{1,3}){3})?(?![\w:])")
_SSN = re.compile(r"(?<![\w-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\w-])")
_UK_NI = re.compile(r"\b(?!BG|GB|KN|NK|NT|TN|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b")
_ID_LABEL = (
    r"passport(?:\s+(?:number|no\.?|#))?"
    r"|(?:national\s+)?identity\s+(?:card\s+)?(?:number|no\.?)|national\s+id(?:\s+(?:card\s+)?(?:number|no\.?))?"
    r"|id\s+(?:card\s+)?(?:number|no\.?)|social\s+security\s+(?:number|no\.?)|ssn"
    r"|tax\s+id(?:\s+(?:number|no\.?))?|driver'?s\s+licen[cs]e(?:\s+(?:number|no\.?))?"
    r"|personnummer|aadhaar(?:\s+(?:number|no\.?))?|dni|nif|cpf|bsn|pesel|nric"
)
_LABELLED_ID = re.compile(
    rf"\b(?P<keep>(?:{_ID_LABEL})\s*(?:is\s+|[:#=-]\s*)?)(?P<value>[A-Z]{{0,3}}\d(?:[ ./-]?\d){{4,19}}[A-Z]?)(?![\w-])",
    re.I,
)
# A run must not start or end inside a longer run of digits (`(?<!\d[ .-])`, `(?![ .-]?\d)`).
_RUN_START = r"(?<![\w+-])(?<!\d[ .-])"
_RUN_END = r"(?![\w-]|[ .-]?\d)"
_CARD = re.compile(rf"{_RUN_START}[2-6](?:[ -]?\d){{12,18}}{_RUN_END}")
# Groups after the country code each start with a separator or a parenthesis: one way to read a
# number, so no backtracking blow-up on long digit runs.
_PHONE_INTERNATIONAL = re.compile(
    rf"{_RUN_START}\+[1-9]\d{{0,14}}(?:[ .-]?\(\d{{1,5}}\)\d{{0,5}}|[ .-]\d{{1,6}}){{0,7}}{_RUN_END}"
)
_PHONE_NORTH_AMERICA = re.compile(rf"{_RUN_START}(?:\([2-9]\d\d\) ?|[2-9]\d\d[ .-])[2-9]\d\d[ .-]\d{{4}}{_RUN_END}")
_PHONE_NATIONAL = re.compile(rf"{_RUN_START}(?:\(0[1-9]\d{{0,3}}\)|0[1-9]\d{{0,3}})(?:[ -]\d{{2,8}}){{1,4}}{_RUN_END}")
_DIGIT = re.compile(r"\d")
_MARKER_OF = {
    kind: re.compile(re.escape(mark) + (f"|{re.escape(SECRET_MARKER)}" if kind == "url_credentials" else ""))
    for kind, mark in MARKERS.items()
}


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, char in enumerate(reversed(digits)):
        n = int(char)
        if i % 2 == 1:
            n = n * 2 - 9 if n > 4 else n * 2
        total += n
    return total % 10 == 0


def _digit_count(text: str) -> int:
    return sum(c.isdigit() for c in text)


def _is_secret_url(url: str) -> bool:
    try:
        parts = urlsplit(url.replace("&amp;", "&"))  # URLs copied out of HTML
        if parts.password:
            return True
        params = parse_qsl(parts.query, keep_blank_values=False) + parse_qsl(parts.fragment, keep_blank_values=False)
    except ValueError:  # malformed (e.g. a bad port): not something we can judge, so leave it
        return False
    return any(name.strip().lower() in SECRET_PARAMETERS for name, _ in params)


def _is_ipv6(candidate: str) -> bool:
    if not _DIGIT.search(candidate):
        return False
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    return True


def _is_card(run: str) -> bool:
    return luhn_valid(re.sub(r"\D", "", run))


class _Detector(NamedTuple):
    kind: str
    pattern: re.Pattern
    accept: Callable[[str], bool] | None = None  # a second look at a match, after the pattern
    marker: str | None = None  # the kind's, unless given
    needs_text: str = ""  # without this substring (or a digit) the pattern cannot match: no need to scan
    needs_digit: bool = False


# In the order they run. A pattern with a `keep` group keeps that part (an id's label).
_DETECTORS = [
    _Detector("url_credentials", _URL, _is_secret_url, needs_text="://"),
    _Detector("url_credentials", _SECRET, marker=SECRET_MARKER),
    _Detector("email", _EMAIL, needs_text="@"),
    _Detector("ip_address", _IPV4, needs_digit=True),
    _Detector("ip_address", _IPV6, _is_ipv6, needs_digit=True),
    _Detector("national_id", _SSN, needs_digit=True),
    _Detector("national_id", _UK_NI, needs_digit=True),
    _Detector("national_id", _LABELLED_ID, needs_digit=True),
    _Detector("card_number", _CARD, _is_card, needs_digit=True),
    _Detector("phone", _PHONE_INTERNATIONAL, lambda run: 8 <= _digit_count(run) <= 15, needs_digit=True),
    _Detector("phone", _PHONE_NORTH_AMERICA, needs_digit=True),
    _Detector("phone", _PHONE_NATIONAL, lambda run: 9 <= _digit_count(run) <= 12, needs_digit=True),
]


def check_kinds(kinds: Iterable[str]) -> tuple[str, ...]:
    """The asked-for kinds in canonical order; ValueError naming the unknown ones and the valid ones."""
    wanted = {kinds} if isinstance(kinds, str) else set(kinds)
    unknown = wanted - set(KINDS)
    if unknown:
        raise ValueError(f"unknown PII kind(s): {', '.join(sorted(unknown))}; valid kinds: {', '.join(KINDS)}")
    return tuple(kind for kind in KINDS if kind in wanted)


def scrub_text(text: str, kinds: Iterable[str] = KINDS) -> tuple[str, Counter]:
    """`text` with every finding of `kinds` replaced by its marker, and the count per kind."""
    counts: Counter = Counter()
    return _scrub(text, check_kinds(kinds), counts), counts


def _scrub(text: str, kinds: tuple[str, ...], counts: Counter) -> str:
    has_digit = _DIGIT.search(text) is not None
    for detector in _DETECTORS:
        if detector.kind not in kinds or (detector.needs_digit and not has_digit) or detector.needs_text not in text:
            continue
        text = detector.pattern.sub(_replacer(detector, counts), text)
    return text


def _replacer(detector: _Detector, counts: Counter) -> Callable[[re.Match], str]:
    marker = detector.marker or MARKERS[detector.kind]

    def replace(match: re.Match) -> str:
        if detector.accept is not None and not detector.accept(match.group(0)):
            return match.group(0)
        counts[detector.kind] += 1
        return (match.groupdict().get("keep") or "") + marker

    return replace


def scrub_record(record: dict[str, Any], kinds: Iterable[str] = KINDS) -> tuple[dict[str, Any], Counter]:
    """The record with every message's content scrubbed (roles, weights and other fields as they were)."""
    return _scrub_record(record, check_kinds(kinds))


def _scrub_record(record: dict[str, Any], kinds: tuple[str, ...]) -> tuple[dict[str, Any], Counter]:
    counts: Counter = Counter()

    def scrubbed(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{**message, "content": _scrub(message["content"], kinds, counts)} for message in messages]

    if is_preference(record):
        parts = {part: scrubbed(record[part]) for part in PREFERENCE_PARTS}
        return {
            **record,
            "input": {**record["input"], "messages": scrubbed(record["input"]["messages"])},
            **parts,
        }, counts
    return {**record, "messages": scrubbed(record["messages"])}, counts


@dataclass
class PiiReport:
    kinds: list[str]
    records_total: int = 0
    records_changed: int = 0
    counts_by_kind: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)  # redacted snippets only

    def to_dict(self) -> dict[str, Any]:
        return {
            "kinds": self.kinds,
            "records_total": self.records_total,
            "records_changed": self.records_changed,
            "counts_by_kind": {kind: self.counts_by_kind.get(kind, 0) for kind in self.kinds},
            "examples": {kind: list(snippets) for kind, snippets in self.examples.items()},
        }

    def collect_examples(self, redacted: dict[str, Any], found: Counter) -> None:
        """Keep a few snippets around markers of kinds not yet shown. A snippet is cut at word
        boundaries, scrubbed again for every kind (not only those asked for) and its remaining digits
        masked, so not even a fragment of a number survives at its edges."""
        for kind in found:
            shown = self.examples.setdefault(kind, [])
            if len(shown) >= MAX_EXAMPLES_PER_KIND:
                continue
            for message in (m for messages in conversations_of(redacted) for m in messages):
                content = message["content"]
                mark = _MARKER_OF[kind].search(content)
                if mark is None:
                    continue
                start, end = max(0, mark.start() - EXAMPLE_CONTEXT), mark.end() + EXAMPLE_CONTEXT
                window = content[start:end]
                if start > 0:
                    window = window.partition(" ")[2]  # drop the cut first word
                if end < len(content):
                    window = window.rpartition(" ")[0]  # and the cut last one
                shown.append(_DIGIT.sub("#", _scrub(window, KINDS, Counter())))
                break


def scrub(
    records: Iterable[dict[str, Any]],
    kinds: Iterable[str] = KINDS,
    progress: Callable[[int], None] | None = None,
) -> tuple[Iterator[dict[str, Any]], PiiReport]:
    """Redacted records as a stream; the report is complete once the stream is consumed."""
    kinds = check_kinds(kinds)
    report = PiiReport(kinds=list(kinds))

    def stream() -> Iterator[dict[str, Any]]:
        for record in records:
            cleaned, counts = _scrub_record(record, kinds)
            report.records_total += 1
            if counts:
                report.records_changed += 1
                report.counts_by_kind.update(counts)
                report.collect_examples(cleaned, counts)
            if progress is not None and report.records_total % 1000 == 0:
                progress(report.records_total)
            yield cleaned

    return stream(), report
