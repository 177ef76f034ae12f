"""Opening hours: BUSINESS_HOURS as people write it (`seg-sex 08:00-18:00; sab 08:00-12:00`), a time zone
and holidays, and the pure answers the reply pipeline needs: open now? when does it next open? which closed
period is this (so an out-of-hours notice goes once per period)?

Everything here is a pure function of its arguments (the clock is passed in): the grammar, with the exact
position of an error, and the decisions are unit-tested with fixed instants (tests/test_hours.py).

Grammar (case and accents ignored; clauses separated by `;` or new lines):
    clause := days ranges
    days   := day ("-" day)? ("," day ("-" day)?)*      seg-sex | sab,dom | mon-fri | sex-seg (wraps)
    ranges := range (("," | " ") range)*                 08:00-12:00, 13:00-18:00 | 8h-18h | 22:00-02:00
A range whose end is not after its start crosses midnight (22:00-02:00 is open until 02:00 of the next day)
and belongs to the day it starts on; a holiday closes the ranges that start on that date. 24:00 ends a day.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DEFAULT_TIMEZONE = "America/Sao_Paulo"
OUT_OF_HOURS_MODES = ("ANSWER", "NOTICE", "SILENT")  # OUT_OF_HOURS_MODE's choices (read in lower case)

# Monday = 0, as date.weekday() counts. Accents are stripped before lookup (sábado = sabado).
DAY_NAMES: dict[str, int] = {
    **dict.fromkeys(("seg", "segunda", "segunda-feira", "mon", "monday"), 0),
    **dict.fromkeys(("ter", "terca", "terca-feira", "tue", "tues", "tuesday"), 1),
    **dict.fromkeys(("qua", "quarta", "quarta-feira", "wed", "weds", "wednesday"), 2),
    **dict.fromkeys(("qui", "quinta", "quinta-feira", "thu", "thur", "thurs", "thursday"), 3),
    **dict.fromkeys(("sex", "sexta", "sexta-feira", "fri", "friday"), 4),
    **dict.fromkeys(("sab", "sabado", "sat", "saturday"), 5),
    **dict.fromkeys(("dom", "domingo", "sun", "sunday"), 6),
}
WEEKDAY_PT = ("segunda-feira", "terça-feira", "quarta-feira", "quinta-feira", "sexta-feira", "sábado", "domingo")
MINUTES_PER_DAY = 24 * 60
SEARCH_DAYS = 400  # how far ahead the next opening is looked for (holidays can close many days in a row)


class HoursSpecError(ValueError):
    """A BUSINESS_HOURS or BUSINESS_HOLIDAYS value that cannot be read; says where (1-based character)."""

    def __init__(self, spec: str, position: int, problem: str) -> None:
        self.spec, self.position, self.problem = spec, position, problem
        super().__init__(f"{problem} at character {position + 1} of {spec!r}")


@dataclass(frozen=True, kw_only=True)
class OpenRange:
    """Open from `start` to `end` minutes after the midnight of `weekday`; end > 1440 crosses midnight."""

    weekday: int
    start: int
    end: int


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """A business's week, its closed dates and its time zone. No ranges = always open (hours not set)."""

    ranges: tuple[OpenRange, ...]
    holidays: frozenset[date]
    timezone: ZoneInfo
    spec: str = ""

    @property
    def always_open(self) -> bool:
        return not self.ranges


@dataclass(frozen=True, kw_only=True)
class HoursStatus:
    """The answer for one instant: open or not, until when, and when it next opens (local times)."""

    now: datetime
    is_open: bool
    closes_at: datetime | None  # when open
    next_open: datetime | None  # when closed; None = no opening within SEARCH_DAYS

    @property
    def closed_period(self) -> str:
        """Names the closed period `now` is in: the same for every instant until the next opening."""
        return "" if self.is_open else (self.next_open.isoformat() if self.next_open else "never")


def _fold(text: str) -> str:
    """Lower case without accents, one character for one ('Sábado' -> 'sabado'), so positions still match."""
    return "".join((unicodedata.normalize("NFKD", ch.lower()) or ch)[0] for ch in text)


# A day name is letters, maybe with the Portuguese "-feira"; a time is 8, 08:00, 8h, 8h30, 08h30.
_DAY = re.compile(r"[^\W\d_]+(?:-feira)?")
_TIME = re.compile(r"(\d{1,2})(?:(?::|h)(\d{2})|h)?")
_WORD_SEPARATOR = re.compile(r"(?:a|as|ate|to)(?=[\s\d])")
_WORD_AND = re.compile(r"(?:e|and)(?=[\s\d])")


class _Scanner:
    def __init__(self, spec: str) -> None:
        self.spec, self.folded, self.at = spec, _fold(spec), 0

    def error(self, problem: str, at: int | None = None) -> HoursSpecError:
        return HoursSpecError(self.spec, self.at if at is None else at, problem)

    def skip_spaces(self) -> None:
        while self.at < len(self.spec) and self.spec[self.at] in " \t":
            self.at += 1

    def peek(self) -> str:
        return self.spec[self.at] if self.at < len(self.spec) else ""

    def take(self, char: str) -> bool:
        if self.peek() == char:
            self.at += 1
            return True
        return False

    def day(self) -> int:
        self.skip_spaces()
        found = _DAY.match(self.folded, self.at)
        if not found:
            raise self.error("expected a day name (seg, ter, qua, qui, sex, sab, dom or mon..sun)")
        name = found.group()
        if name not in DAY_NAMES:
            raise self.error(f"unknown day name {self.spec[self.at : found.end()]!r}")
        self.at = found.end()
        return DAY_NAMES[name]

    def separator(self) -> bool:
        """'-', or the words people put between two days or two times: a, as, às, ate, até, to."""
        self.skip_spaces()
        if self.take("-"):
            return True
        found = _WORD_SEPARATOR.match(self.folded, self.at)
        if found:
            self.at = found.end()
            return True
        return False

    def minutes(self, *, end: bool) -> int:
        self.skip_spaces()
        started = self.at
        found = _TIME.match(self.folded, self.at)
        if not found:
            raise self.error("expected a time such as 08:00 or 8h")
        hours, minutes = int(found.group(1)), int(found.group(2) or 0)
        if minutes > 59 or hours > 24 or (hours == 24 and (minutes or not end)):
            raise self.error(f"{self.spec[started : found.end()]!r} is not a time of day", started)
        self.at = found.end()
        return hours * 60 + minutes


def _days(scanner: _Scanner) -> list[int]:
    chosen: list[int] = []
    while True:
        first = scanner.day()
        last = first
        if scanner.separator():
            last = scanner.day()
        span = (last - first) % 7
        chosen.extend((first + step) % 7 for step in range(span + 1))
        scanner.skip_spaces()
        if not scanner.take(","):
            return chosen
        scanner.skip_spaces()
        if scanner.peek().isdigit():
            raise scanner.error("expected a day name after ','")


def _ranges(scanner: _Scanner, days: list[int]) -> list[OpenRange]:
    found: list[OpenRange] = []
    while True:
        scanner.skip_spaces()
        start = scanner.minutes(end=False)
        if not scanner.separator():
            raise scanner.error("expected '-' between the opening and the closing time")
        scanner.skip_spaces()
        end_at = scanner.at
        end = scanner.minutes(end=True)
        if end == start:
            raise scanner.error("a range must not open and close at the same time", end_at)
        if end < start:
            end += MINUTES_PER_DAY  # crosses midnight
        found.extend(OpenRange(weekday=day, start=start, end=end) for day in days)
        scanner.skip_spaces()
        joined = _WORD_AND.match(scanner.folded, scanner.at)
        if joined:
            scanner.at = joined.end()
            continue
        if scanner.take(",") or scanner.peek().isdigit():
            continue
        return found


def parse_hours(spec: str) -> tuple[OpenRange, ...]:
    """BUSINESS_HOURS's ranges; raise HoursSpecError with the position of the first problem."""
    scanner = _Scanner(spec.replace("\n", ";"))
    ranges: list[OpenRange] = []
    while True:
        scanner.skip_spaces()
        while scanner.take(";"):
            scanner.skip_spaces()
        if not scanner.peek():
            return tuple(ranges)
        ranges.extend(_ranges(scanner, _days(scanner)))
        scanner.skip_spaces()
        if scanner.peek() and not scanner.take(";"):
            raise scanner.error("expected ';' before the next days")


def parse_holidays(spec: str) -> frozenset[date]:
    """BUSINESS_HOLIDAYS: ISO dates separated by commas, spaces or semicolons."""
    days: set[date] = set()
    for found in re.finditer(r"[^,;\s]+", spec):
        try:
            days.add(date.fromisoformat(found.group()))
        except ValueError:
            raise HoursSpecError(spec, found.start(), f"{found.group()!r} is not an ISO date (YYYY-MM-DD)") from None
    return frozenset(days)


def load_timezone(name: str) -> ZoneInfo:
    """The zone by its IANA name; ValueError saying how to fix a wrong name or a machine without tzdata."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"{name!r} is not a known time zone: use an IANA name such as America/Sao_Paulo"
            " (on a machine without time zone data: apt-get install tzdata, or pip install tzdata)"
        ) from None


def build_schedule(hours: str, *, timezone: str, holidays: str = "") -> Schedule:
    """Parse all three settings into a Schedule (raises HoursSpecError or ValueError)."""
    return Schedule(
        ranges=parse_hours(hours),
        holidays=parse_holidays(holidays),
        timezone=load_timezone(timezone),
        spec=" ".join(hours.split()),
    )


def schedule_problems(hours: str, timezone: str, holidays: str) -> list[str]:
    """Start-up problems of BUSINESS_HOURS, BUSINESS_TIMEZONE and BUSINESS_HOLIDAYS, each saying where and how."""
    problems = []
    for name, spec, parse in (("BUSINESS_HOURS", hours, parse_hours), ("BUSINESS_HOLIDAYS", holidays, parse_holidays)):
        try:
            parse(spec)
        except HoursSpecError as exc:
            pointer = " " * exc.position + "^"
            shown = spec.replace("\n", " ")
            problems.append(f"{name}: {exc.problem} at character {exc.position + 1}:\n      {shown}\n      {pointer}")
    try:
        load_timezone(timezone)
    except ValueError as exc:
        problems.append(f"BUSINESS_TIMEZONE: {exc}")
    return problems


def _intervals(schedule: Schedule, first: date, days: int) -> Iterator[tuple[datetime, datetime]]:
    """Open intervals (naive local wall times) of the ranges that start on `first` .. `first + days - 1`, in
    order of their start, made lazily: a day's ranges all start before the next day's."""
    for offset in range(days):
        day = first + timedelta(days=offset)
        if day in schedule.holidays:
            continue
        midnight = datetime(day.year, day.month, day.day)
        starts = sorted((r.start, r.end) for r in schedule.ranges if r.weekday == day.weekday())
        for start, end in starts:
            yield midnight + timedelta(minutes=start), midnight + timedelta(minutes=end)


def _merged(intervals: Iterable[tuple[datetime, datetime]]) -> Iterator[tuple[datetime, datetime]]:
    """Touching or overlapping intervals as one (24:00 then 00:00 is one opening), still lazily."""
    current: tuple[datetime, datetime] | None = None
    for start, end in intervals:
        if current is not None and start <= current[1]:
            current = (current[0], max(current[1], end))
            continue
        if current is not None:
            yield current
        current = (start, end)
    if current is not None:
        yield current


def _aware(local: datetime, zone: ZoneInfo) -> datetime:
    return local.replace(tzinfo=zone)


def hours_status(schedule: Schedule, now_unix: float) -> HoursStatus:
    """Open now? Until when, or from when? Wall-clock comparison in the business's zone (DST included)."""
    now = datetime.fromtimestamp(now_unix, schedule.timezone)
    if schedule.always_open:
        return HoursStatus(now=now, is_open=True, closes_at=None, next_open=None)
    wall = now.replace(tzinfo=None)
    # Ranges that started yesterday may still be open (midnight crossing); look a whole search window ahead.
    intervals = _merged(_intervals(schedule, wall.date() - timedelta(days=1), SEARCH_DAYS + 1))
    for start, end in intervals:
        if start <= wall < end:
            return HoursStatus(now=now, is_open=True, closes_at=_aware(end, schedule.timezone), next_open=None)
        if start > wall:
            return HoursStatus(now=now, is_open=False, closes_at=None, next_open=_aware(start, schedule.timezone))
    return HoursStatus(now=now, is_open=False, closes_at=None, next_open=None)


def _clock(moment: datetime) -> str:
    return moment.strftime("%H:%M")


def when_phrase(moment: datetime, now: datetime) -> str:
    """'hoje às 13:00', 'amanhã às 08:00', 'segunda-feira (07/12) às 08:00', as a customer reads it."""
    days = (moment.date() - now.date()).days
    if days == 0:
        return f"hoje às {_clock(moment)}"
    if days == 1:
        return f"amanhã às {_clock(moment)}"
    return f"{WEEKDAY_PT[moment.weekday()]} ({moment:%d/%m}) às {_clock(moment)}"


def prompt_note(schedule: Schedule, status: HoursStatus) -> str:
    """What the LLM is told about the date and the hours (pt-BR, the customers' language), for this minute."""
    now = status.now
    lines = [f"Agora são {_clock(now)} de {WEEKDAY_PT[now.weekday()]}, {now:%d/%m/%Y} ({schedule.timezone.key})."]
    if schedule.always_open:
        return lines[0]
    lines.append(f"Horário de atendimento da equipe: {schedule.spec}.")
    if status.is_open:
        closes = status.closes_at
        lines.append("A equipe está atendendo agora" + (f" (até {when_phrase(closes, now)})." if closes else "."))
    elif status.next_open is not None:
        lines.append(
            f"A equipe está fora do horário agora e retorna {when_phrase(status.next_open, now)}; "
            "se o cliente pedir uma pessoa, diga quando a equipe retorna."
        )
    else:
        lines.append("A equipe está fora do horário agora.")
    return "\n".join(lines)


def notice_text(template: str, schedule: Schedule, status: HoursStatus) -> str:
    """OUT_OF_HOURS_NOTICE with {hours} and {next_open} filled in."""
    next_open = when_phrase(status.next_open, status.now) if status.next_open else "em breve"
    return template.replace("{hours}", schedule.spec).replace("{next_open}", next_open)
