"""Opening hours with a fixed clock: the grammar (Portuguese and English, errors with their position), day
boundaries, midnight-crossing ranges, holidays, a DST-observing zone, and what the LLM and the customer read."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from whatsapp_webhook.business import OutOfHoursAction, out_of_hours_action
from whatsapp_webhook.hours import (
    HoursSpecError,
    OpenRange,
    build_schedule,
    hours_status,
    notice_text,
    parse_hours,
    prompt_note,
    schedule_problems,
)
from whatsapp_webhook.settings import Settings, SettingsError

SAO_PAULO = ZoneInfo("America/Sao_Paulo")
SHOP = "seg-sex 08:00-18:00; sab 08:00-12:00"


def at(text: str, zone: ZoneInfo = SAO_PAULO) -> float:
    """The instant a wall clock in `zone` shows `text` (YYYY-MM-DD HH:MM)."""
    return datetime.fromisoformat(text).replace(tzinfo=zone).timestamp()


def local(moment: datetime | None) -> str:
    assert moment is not None
    return moment.strftime("%Y-%m-%d %H:%M %a")


def test_portuguese_and_english_day_names_read_alike() -> None:
    week = parse_hours(SHOP)
    assert parse_hours("mon-fri 08:00-18:00; sat 08:00-12:00") == week
    assert parse_hours("Segunda a Sexta 8h às 18h; Sábado 8h-12h") == week
    assert parse_hours("segunda-feira-sexta-feira 08:00 - 18:00\nSÁB 8:00-12:00") == week
    assert parse_hours("seg,ter,qua,qui,sex 08h00-18h00; sáb 08:00-12:00") == week
    assert week == tuple(OpenRange(weekday=d, start=480, end=1080) for d in range(5)) + (
        OpenRange(weekday=5, start=480, end=720),
    )
    # Two ranges a day (lunch break), and a range of days that wraps past Sunday.
    assert parse_hours("ter 8h-12h e 13h30-18h") == (
        OpenRange(weekday=1, start=480, end=720),
        OpenRange(weekday=1, start=810, end=1080),
    )
    assert [r.weekday for r in parse_hours("sex-seg 10:00-14:00")] == [4, 5, 6, 0]
    assert parse_hours("") == () and parse_hours(" ; ") == ()


@pytest.mark.parametrize(
    ("spec", "position", "problem"),
    [
        ("seg-sexx 08:00-18:00", 4, "unknown day name 'sexx'"),
        ("seg-sex 08:00-25:00", 14, "'25:00' is not a time of day"),
        ("seg-sex 08:61-18:00", 8, "'08:61' is not a time of day"),
        ("seg-sex 08:00 18:00", 14, "expected '-' between the opening and the closing time"),
        ("seg-sex 08:00-08:00", 14, "a range must not open and close at the same time"),
        ("08:00-18:00", 0, "expected a day name"),
        ("seg-sex 08:00-18:00 sab 08:00-12:00", 20, "expected ';' before the next days"),
        ("seg-sex", 7, "expected a time such as 08:00 or 8h"),
    ],
)
def test_a_spec_that_cannot_be_read_names_the_exact_position(spec: str, position: int, problem: str) -> None:
    with pytest.raises(HoursSpecError) as raised:
        parse_hours(spec)
    assert raised.value.position == position
    assert raised.value.problem.startswith(problem)


def test_start_up_stops_on_a_bad_spec_pointing_at_the_character() -> None:
    env = {"OPENROUTER_API_KEY": "sk-or-v1-test", "WAHA_API_KEY": "waha-test"}
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({**env, "BUSINESS_HOURS": "seg-sexx 08:00-18:00", "BUSINESS_HOLIDAYS": "2026-12-25, 25/12",
                           "BUSINESS_TIMEZONE": "America/Sao_Paolo"})
    message = str(raised.value)
    assert "BUSINESS_HOURS: unknown day name 'sexx' at character 5:\n      seg-sexx 08:00-18:00\n          ^" in message
    assert "BUSINESS_HOLIDAYS: '25/12' is not an ISO date (YYYY-MM-DD) at character 13" in message
    assert "BUSINESS_TIMEZONE: 'America/Sao_Paolo' is not a known time zone" in message
    assert schedule_problems(SHOP, "America/Sao_Paulo", "2026-12-25") == []


def test_the_timezone_data_is_there_offline() -> None:
    # zoneinfo reads the system's tzdata (or the tzdata package); the default zone must load on this machine.
    assert build_schedule(SHOP, timezone="America/Sao_Paulo").timezone.key == "America/Sao_Paulo"


@pytest.mark.parametrize(
    ("when", "is_open"),
    [
        ("2026-12-01 07:59", False),  # a Tuesday, one minute before opening
        ("2026-12-01 08:00", True),  # opening minute is open
        ("2026-12-01 17:59", True),
        ("2026-12-01 18:00", False),  # closing minute is closed
        ("2026-12-05 11:59", True),  # Saturday morning
        ("2026-12-05 12:00", False),
        ("2026-12-06 10:00", False),  # Sunday
    ],
)
def test_day_boundaries(when: str, is_open: bool) -> None:
    assert hours_status(build_schedule(SHOP, timezone="America/Sao_Paulo"), at(when)).is_open is is_open


def test_closed_it_says_when_it_next_opens_and_open_when_it_closes() -> None:
    schedule = build_schedule(SHOP, timezone="America/Sao_Paulo")
    friday_night = hours_status(schedule, at("2026-12-04 19:30"))
    assert local(friday_night.next_open) == "2026-12-05 08:00 Sat"
    saturday_noon = hours_status(schedule, at("2026-12-05 12:00"))
    assert local(saturday_noon.next_open) == "2026-12-07 08:00 Mon"
    open_now = hours_status(schedule, at("2026-12-01 09:15"))
    assert local(open_now.closes_at) == "2026-12-01 18:00 Tue" and open_now.next_open is None


def test_a_range_crossing_midnight_stays_open_into_the_next_day() -> None:
    bar = build_schedule("sex-sab 22:00-02:00", timezone="America/Sao_Paulo")
    assert not hours_status(bar, at("2026-12-04 21:59")).is_open  # Friday
    late = hours_status(bar, at("2026-12-05 01:30"))  # Saturday, after midnight: Friday's range
    assert late.is_open and local(late.closes_at) == "2026-12-05 02:00 Sat"
    assert not hours_status(bar, at("2026-12-05 02:00")).is_open
    assert hours_status(bar, at("2026-12-05 23:00")).is_open
    assert hours_status(bar, at("2026-12-06 01:59")).is_open  # Sunday morning: Saturday's range
    assert local(hours_status(bar, at("2026-12-06 02:00")).next_open) == "2026-12-11 22:00 Fri"
    # A range ending at 24:00 and the next day's range starting at 00:00 are one opening.
    nonstop = build_schedule("seg 08:00-24:00; ter 00:00-12:00", timezone="America/Sao_Paulo")
    assert local(hours_status(nonstop, at("2026-11-30 23:00")).closes_at) == "2026-12-01 12:00 Tue"


def test_holidays_close_the_day_and_move_the_next_opening() -> None:
    schedule = build_schedule(SHOP, timezone="America/Sao_Paulo", holidays="2026-12-25, 2027-01-01")
    christmas = hours_status(schedule, at("2026-12-25 10:00"))  # a Friday
    assert not christmas.is_open
    assert local(christmas.next_open) == "2026-12-26 08:00 Sat"
    eve = hours_status(schedule, at("2026-12-24 18:30"))
    assert local(eve.next_open) == "2026-12-26 08:00 Sat"
    assert eve.closed_period == christmas.closed_period  # one closed period from Thursday 18:00 to Saturday 08:00
    assert hours_status(schedule, at("2026-12-26 09:00")).is_open


def test_a_dst_observing_zone_follows_the_wall_clock() -> None:
    # New York moves its clocks forward on 2026-03-08: 09:00 is 14:00 UTC before, 13:00 UTC after.
    new_york = ZoneInfo("America/New_York")
    schedule = build_schedule("mon-fri 09:00-17:00", timezone="America/New_York")
    utc = ZoneInfo("UTC")
    assert not hours_status(schedule, at("2026-03-06 13:30", utc)).is_open  # Friday 08:30 EST
    assert hours_status(schedule, at("2026-03-09 13:30", utc)).is_open  # Monday 09:30 EDT
    weekend = hours_status(schedule, at("2026-03-07 12:00", new_york))
    assert weekend.next_open is not None
    assert weekend.next_open.timestamp() == at("2026-03-09 13:00", utc)  # Monday 09:00 EDT, across the change
    # Autumn: 01:30 happens twice on 2026-11-01; a night range still closes at the wall clock's 02:00.
    night = build_schedule("sat 22:00-02:00", timezone="America/New_York")
    assert hours_status(night, at("2026-11-01 05:45", utc)).is_open  # 01:45 EDT, first pass
    assert not hours_status(night, at("2026-11-01 07:05", utc)).is_open  # 02:05 EST


def test_the_closed_period_names_one_stretch_of_closed_time() -> None:
    schedule = build_schedule(SHOP, timezone="America/Sao_Paulo")
    evening, night, morning = (hours_status(schedule, at(t)) for t in ("2026-12-01 18:00", "2026-12-02 03:00",
                                                                        "2026-12-02 07:59"))
    assert evening.closed_period == night.closed_period == morning.closed_period != ""
    next_evening = hours_status(schedule, at("2026-12-02 18:01"))
    assert next_evening.closed_period != evening.closed_period
    assert hours_status(schedule, at("2026-12-02 09:00")).closed_period == ""


def test_what_the_llm_and_the_customer_read() -> None:
    schedule = build_schedule(SHOP, timezone="America/Sao_Paulo")
    closed = hours_status(schedule, at("2026-12-01 19:00"))
    note = prompt_note(schedule, closed)
    assert "Agora são 19:00 de terça-feira, 01/12/2026 (America/Sao_Paulo)." in note
    assert "Horário de atendimento da equipe: seg-sex 08:00-18:00; sab 08:00-12:00." in note
    assert "retorna amanhã às 08:00" in note
    assert "atendendo agora (até hoje às 18:00)" in prompt_note(schedule, hours_status(schedule, at("2026-12-01 10:00")))
    saturday = hours_status(schedule, at("2026-12-05 13:00"))
    assert "retorna segunda-feira (07/12) às 08:00" in prompt_note(schedule, saturday)
    assert notice_text("Fechados ({hours}); voltamos {next_open}.", schedule, closed) == (
        "Fechados (seg-sex 08:00-18:00; sab 08:00-12:00); voltamos amanhã às 08:00."
    )
    always = build_schedule("", timezone="America/Sao_Paulo")
    assert hours_status(always, at("2026-12-06 03:00")).is_open


def test_out_of_hours_decisions() -> None:
    schedule = build_schedule(SHOP, timezone="America/Sao_Paulo")
    closed, opened = hours_status(schedule, at("2026-12-01 20:00")), hours_status(schedule, at("2026-12-01 10:00"))
    assert out_of_hours_action("notice", opened, first_in_period=True) is OutOfHoursAction.ANSWER
    assert out_of_hours_action("answer", closed, first_in_period=True) is OutOfHoursAction.ANSWER
    assert out_of_hours_action("notice", closed, first_in_period=True) is OutOfHoursAction.NOTICE
    assert out_of_hours_action("notice", closed, first_in_period=False) is OutOfHoursAction.SILENT
    assert out_of_hours_action("silent", closed, first_in_period=True) is OutOfHoursAction.SILENT
