"""Media: the committed files, parsing WAHA's media object, allowed origins, magic numbers, the streamed
download (respx at WAHA's HTTP boundary) and the note the model writes for the history."""

from __future__ import annotations

import asyncio
import base64
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from hypothesis import given
from hypothesis import strategies as st

from fakes import make_media
from fakes import waha_payloads as wp
from tests.conftest import make_settings
from whatsapp_webhook import media_fetch
from whatsapp_webhook.events import IncomingMessage, classify_event, parse_event
from whatsapp_webhook.media import (
    MediaKind,
    OriginVerdict,
    content_part,
    kind_of,
    matches_mimetype,
    media_source,
    strip_media_note,
)
from whatsapp_webhook.media_fetch import (
    MEDIA_FETCH_ATTEMPTS,
    MediaBudget,
    MediaDownloadError,
    MediaFailure,
    MediaFetcher,
    download_media,
    input_kinds_of,
)
from whatsapp_webhook.media_reply import MediaTurns
from whatsapp_webhook.store import StateStore
from whatsapp_webhook.store_api import MediaJobState
from whatsapp_webhook.upstream import upstream_client

MEDIA = Path(make_media.MEDIA_DIR)
FILES = {  # file -> the mimetype WhatsApp declares for it
    "voice_note.ogg": "audio/ogg; codecs=opus",
    "product.jpg": "image/jpeg",
    "sticker.webp": "image/webp",
    "boleto.pdf": "application/pdf",
    "voice_note_long.ogg": "audio/ogg",  # ~13 s, for bench/media_bench.py
}


def media_bytes(name: str) -> bytes:
    return (MEDIA / name).read_bytes()


def classify(envelope: dict[str, Any]) -> Any:
    return classify_event(parse_event(wp.dumps(envelope)), reply_in_groups=True)


# --- the committed files ---------------------------------------------------------------------------------

def test_the_media_files_are_the_ones_the_script_made_and_small() -> None:
    assert make_media.check() == []
    assert sorted(p.name for p in make_media._files()) == sorted(FILES)


@pytest.mark.parametrize("name", FILES)
def test_each_file_starts_like_its_declared_type_and_not_like_the_others(name: str) -> None:
    data = media_bytes(name)
    assert matches_mimetype(data, FILES[name])
    for mimetype in {m for m in FILES.values() if m.split(";")[0] != FILES[name].split(";")[0]}:
        assert not matches_mimetype(data, mimetype), (name, mimetype)


# --- WAHA's media object, three engines --------------------------------------------------------------------

@pytest.mark.parametrize("engine", wp.ENGINES)
@pytest.mark.parametrize("kind, mimetype", [("audio", "audio/ogg; codecs=opus"), ("image", "image/jpeg"),
                                            ("sticker", "image/webp"), ("document", "application/pdf")])
def test_every_engine_gives_the_url_mimetype_and_filename(engine: str, kind: str, mimetype: str) -> None:
    envelope = wp.media_message(engine, kind=kind, filename="boleto.pdf" if kind == "document" else None)
    message = classify(envelope)
    assert isinstance(message, IncomingMessage)
    assert message.has_media and message.media_error is None
    assert message.media_url == envelope["payload"]["media"]["url"]
    assert message.media_url.startswith("http://localhost:3000/api/files/")
    assert message.media_mimetype == mimetype
    assert message.media_filename == ("boleto.pdf" if kind == "document" else None)
    assert message.text is None
    assert IncomingMessage.from_json(message.to_json()) == message  # survives the inbox


@pytest.mark.parametrize("engine", wp.ENGINES)
def test_the_caption_is_the_text_of_a_media_message(engine: str) -> None:
    message = classify(wp.media_message(engine, caption="quanto custa?"))
    assert message.text == "quanto custa?" and message.has_media and message.media_url


@pytest.mark.parametrize("engine", wp.ENGINES)
def test_a_file_waha_did_not_download_or_failed_to_is_flagged_with_why(engine: str) -> None:
    not_downloaded = classify(wp.media_message(engine, kind="audio", download=False))
    assert not_downloaded.has_media and not_downloaded.media_url is None
    assert not_downloaded.media_error == "not_downloaded"
    failed = classify(wp.media_message(engine, kind="image", media_error={"message": "Failed", "name": "Error"}))
    assert failed.media_url is None and failed.media_error == "waha_error"
    assert failed.media_mimetype == "image/jpeg"


def test_a_file_waha_did_not_download_still_has_its_kind_from_the_engines_raw_message() -> None:
    # WAHA_EVENTS_DOWNLOAD_MEDIA_MIMETYPES=audio,image,application/pdf: a video arrives without media
    message = classify(wp.media_message("WEBJS", kind="document", mimetype="video/mp4", download=False))
    assert message.media_error == "not_downloaded" and kind_of(message.media_mimetype) is MediaKind.UNSUPPORTED


def test_an_old_inbox_row_without_media_fields_still_loads() -> None:
    message = classify(wp.text_message("WEBJS", body="oi"))
    legacy = {k: v for k, v in message.__dict__.items() if not k.startswith(("media_", "has_media"))}
    assert IncomingMessage(**legacy).has_media is False


# --- where a file may be fetched from ------------------------------------------------------------------

WAHA = "http://waha:3000"


@pytest.mark.parametrize("url", ["http://localhost:3000/api/files/default/A.oga",
                                 "http://127.0.0.1:3000/api/files/default/A.oga",
                                 "http://LOCALHOST/api/files/default/A.oga"])
def test_wahas_default_localhost_urls_are_fetched_from_waha_base_url(url: str) -> None:
    source = media_source(url, waha_base_url=WAHA)
    assert source.verdict is OriginVerdict.WAHA and source.sends_api_key
    assert source.url == "http://waha:3000/api/files/default/A.oga"


def test_wahas_own_origin_gets_the_key_and_an_allowed_origin_does_not() -> None:
    assert media_source("http://waha:3000/api/files/x.jpeg", waha_base_url=WAHA).sends_api_key
    s3 = media_source("https://bucket.s3.amazonaws.com/x.jpeg?X-Amz-Signature=abc", waha_base_url=WAHA,
                      allowed_origins=("https://bucket.s3.amazonaws.com",))
    assert s3.verdict is OriginVerdict.ALLOWED and not s3.sends_api_key
    assert s3.url == "https://bucket.s3.amazonaws.com/x.jpeg?X-Amz-Signature=abc"


@pytest.mark.parametrize("url", [
    "http://evil.test/api/files/x.jpeg",
    "http://waha:3001/api/files/x.jpeg",  # another port is another origin
    "https://waha:3000/api/files/x.jpeg",  # and another scheme
    "http://waha:3000@evil.test/api/files/x.jpeg",  # userinfo trick
    "http://localhost@evil.test/x.jpeg",
    "file:///etc/passwd",
    "gopher://waha:3000/x",
    "http://169.254.169.254/latest/meta-data/",
    "http://waha:3000/api/files/x.jpeg\r\nX-Injected: 1",
    "http://[::ffff:127.0.0.2]/x",
    "http://waha:99999/x",
    "not a url",
])
def test_any_other_host_is_refused(url: str) -> None:
    source = media_source(url, waha_base_url=WAHA, allowed_origins=("https://bucket.s3.amazonaws.com",))
    assert source.verdict is OriginVerdict.REFUSED and source.url is None


@pytest.mark.parametrize("url", [
    "http://localhost:3000/api/screenshot?session=default",  # WAHA's key would open any endpoint
    "http://waha:3000/api/sessions",
    "http://localhost:3000/api/files/../screenshot?session=default",  # httpx would send /api/screenshot
    "http://waha:3000/api/files/default/../../screenshot",
    "http://localhost:3000/api/files/./default/A.oga",
    "http://localhost:3000/api/files/%2e%2e/screenshot",
    "http://localhost:3000/api/files/%2E%2E/screenshot",
    "http://localhost:3000/api/files/default%2F..%2F..%2Fscreenshot",
    "http://localhost:3000/api/files/default%5c..%5cscreenshot",
    "http://localhost:3000/api/files/default\\..\\screenshot",
    "http://localhost:3000/api/files/",
    "http://localhost:3000/api/filesystem/x",
    "http://localhost:3000/",
])
def test_on_wahas_origin_only_a_file_under_api_files_is_fetched(url: str) -> None:
    source = media_source(url, waha_base_url=WAHA)
    assert source.verdict is OriginVerdict.REFUSED and source.url is None and not source.sends_api_key


def test_waha_base_urls_path_prefix_is_kept_and_wahas_query_dropped() -> None:
    behind_proxy = "http://proxy:8080/waha/"
    rewritten = media_source("http://localhost:3000/api/files/default/A.oga?session=x", waha_base_url=behind_proxy)
    assert rewritten.url == "http://proxy:8080/waha/api/files/default/A.oga" and rewritten.sends_api_key
    own = media_source("http://proxy:8080/waha/api/files/default/A.oga", waha_base_url=behind_proxy)
    assert own.url == "http://proxy:8080/waha/api/files/default/A.oga"
    assert media_source("http://proxy:8080/api/files/default/A.oga", waha_base_url=behind_proxy).url is None


@pytest.mark.parametrize("data, is_pdf", [
    (b"%PDF-1.4\n...", True),
    (b"\xef\xbb\xbf%PDF-1.7\n", True),  # a BOM
    (b"\r\n \t%PDF-1.5\n", True),  # blank lines some generators write first
    (b"\xff\xd8\xff\xe0 JPEG whose comment says %PDF-1.4", False),
    (b"<html>%PDF-1.4</html>", False),
])
def test_a_pdf_must_start_with_its_signature(data: bytes, is_pdf: bool) -> None:
    assert matches_mimetype(data, "application/pdf") is is_pdf


def test_wahas_screenshot_is_never_fetched_with_the_key(tmp_path: Path) -> None:
    with respx.mock(using="http11", assert_all_mocked=False, assert_all_called=False) as router:
        screenshot = router.get(url__regex=r".*/api/screenshot.*").respond(200, content=media_bytes("product.jpg"))
        with pytest.raises(MediaDownloadError) as caught:
            fetch(tmp_path, "http://localhost:3000/api/screenshot?session=default", "image/jpeg")
    assert caught.value.reason is MediaFailure.REFUSED_ORIGIN and not screenshot.called


# --- the download -----------------------------------------------------------------------------------------

def settings(tmp_path: Path, **overrides: Any) -> Any:
    return make_settings(tmp_path, waha_base_url=WAHA, **overrides)


def fetch(tmp_path: Path, url: str, mimetype: str, **overrides: Any) -> bytes:
    """download_media over the client a worker downloads with (httpx on http11; respx patches its transport)."""
    async def run() -> bytes:
        async with upstream_client(transport=None, max_connections=4, timeout=httpx.Timeout(10)) as http:
            return await download_media(http, url, mimetype=mimetype, settings=settings(tmp_path, **overrides))
    return asyncio.run(run())


def test_a_voice_note_is_downloaded_from_waha_with_the_api_key(tmp_path: Path) -> None:
    voice = media_bytes("voice_note.ogg")
    with respx.mock(using="http11", assert_all_mocked=True) as router:
        route = router.get("http://waha:3000/api/files/default/A.oga").respond(200, content=voice)
        assert fetch(tmp_path, "http://localhost:3000/api/files/default/A.oga", "audio/ogg; codecs=opus") == voice
    assert route.calls.last.request.headers["X-Api-Key"] == "test-waha-key"


def test_an_allowed_origin_never_gets_wahas_key(tmp_path: Path) -> None:
    photo = media_bytes("product.jpg")
    with respx.mock(using="http11", assert_all_mocked=True) as router:
        route = router.get("https://bucket.test/p.jpeg").respond(200, content=photo)
        assert fetch(tmp_path, "https://bucket.test/p.jpeg", "image/jpeg",
                     media_allowed_origins=("https://bucket.test",)) == photo
    assert "X-Api-Key" not in route.calls.last.request.headers


def test_another_host_is_never_contacted(tmp_path: Path) -> None:
    with respx.mock(using="http11", assert_all_mocked=True, assert_all_called=False) as router:
        other = router.get(url__regex=r"http://evil\.test/.*").respond(200, content=media_bytes("product.jpg"))
        with pytest.raises(MediaDownloadError) as caught:
            fetch(tmp_path, "http://evil.test/api/files/p.jpeg", "image/jpeg")
    assert caught.value.reason is MediaFailure.REFUSED_ORIGIN and not other.called


def test_an_expired_file_is_not_found(tmp_path: Path) -> None:
    with respx.mock(using="http11", assert_all_mocked=True) as router:
        router.get("http://waha:3000/api/files/default/A.oga").respond(404, json={"statusCode": 404})
        with pytest.raises(MediaDownloadError) as caught:
            fetch(tmp_path, "http://waha:3000/api/files/default/A.oga", "audio/ogg")
    assert caught.value.reason is MediaFailure.NOT_FOUND and not caught.value.transient


def test_a_redirect_is_not_followed(tmp_path: Path) -> None:
    with respx.mock(using="http11", assert_all_mocked=True, assert_all_called=False) as router:
        router.get("http://waha:3000/api/files/a.jpeg").respond(302, headers={"Location": "http://evil.test/x"})
        elsewhere = router.get("http://evil.test/x").respond(200, content=media_bytes("product.jpg"))
        with pytest.raises(MediaDownloadError):
            fetch(tmp_path, "http://waha:3000/api/files/a.jpeg", "image/jpeg")
    assert not elsewhere.called


def test_a_declared_size_over_the_cap_is_refused_before_reading(tmp_path: Path) -> None:
    with respx.mock(using="http11", assert_all_mocked=True) as router:
        router.get("http://waha:3000/api/files/big.jpeg").respond(
            200, headers={"Content-Length": "5000000"}, content=b"\xff\xd8\xff" + b"0" * 4_999_997)
        with pytest.raises(MediaDownloadError) as caught:
            fetch(tmp_path, "http://waha:3000/api/files/big.jpeg", "image/jpeg", media_max_bytes=100_000)
    assert caught.value.reason is MediaFailure.TOO_LARGE


def test_an_undeclared_size_over_the_cap_stops_reading_at_the_cap(tmp_path: Path) -> None:
    yielded: list[int] = []

    class Endless(httpx.AsyncByteStream):
        async def __aiter__(self):  # type: ignore[override]
            yield b"\xff\xd8\xff"
            for _ in range(10_000):  # 640 MB if read to the end
                yielded.append(1)
                yield b"0" * 65_536

    with respx.mock(using="http11", assert_all_mocked=True) as router:
        router.get("http://waha:3000/api/files/big.jpeg").mock(
            return_value=httpx.Response(200, stream=Endless()))
        with pytest.raises(MediaDownloadError) as caught:
            fetch(tmp_path, "http://waha:3000/api/files/big.jpeg", "image/jpeg", media_max_bytes=200_000)
    assert caught.value.reason is MediaFailure.TOO_LARGE
    assert len(yielded) <= 200_000 // 65_536 + 2  # read up to the cap, then stopped


def test_bytes_that_are_not_the_declared_type_are_refused(tmp_path: Path) -> None:
    with respx.mock(using="http11", assert_all_mocked=True) as router:
        router.get("http://waha:3000/api/files/a.pdf").respond(200, content=media_bytes("product.jpg"))
        with pytest.raises(MediaDownloadError) as caught:
            fetch(tmp_path, "http://waha:3000/api/files/a.pdf", "application/pdf")
    assert caught.value.reason is MediaFailure.WRONG_TYPE


def test_a_slow_file_times_out_as_a_transient_failure(tmp_path: Path) -> None:
    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(5)
        return httpx.Response(200, content=media_bytes("product.jpg"))

    with respx.mock(using="http11", assert_all_mocked=True, assert_all_called=False) as router:
        router.get("http://waha:3000/api/files/a.jpeg").mock(side_effect=slow)
        with pytest.raises(MediaDownloadError) as caught:
            fetch(tmp_path, "http://waha:3000/api/files/a.jpeg", "image/jpeg", media_download_timeout_seconds=0.5)
    assert caught.value.reason is MediaFailure.TIMEOUT and caught.value.transient


def test_a_download_that_fails_in_our_own_code_is_given_up_after_the_attempts(tmp_path: Path, monkeypatch) -> None:
    now = [1_700_000_000.0]
    store = StateStore(str(tmp_path / "state.db"), clock=lambda: now[0])
    store.initialize()
    message = classify(wp.media_message("WEBJS", kind="audio"))
    store.accept(message)

    async def broken(*args: Any, **kwargs: Any) -> bytes:
        raise RuntimeError("a bug of ours")

    monkeypatch.setattr(media_fetch, "download_media", broken)

    async def run() -> int:
        tries = 0
        async with httpx.AsyncClient() as http:
            fetcher = MediaFetcher(store=store, http=http, settings=settings(tmp_path))
            for _ in range(MEDIA_FETCH_ATTEMPTS + 3):  # a minute or so of the fetcher's polling
                for job in store.claim_media_jobs(fetcher.owner, limit=1, lease_seconds=30):
                    tries += 1
                    await fetcher._fetch(job)
                now[0] += 10
        return tries

    assert asyncio.run(run()) == MEDIA_FETCH_ATTEMPTS
    status = store.media_job(message.dedupe_key)
    assert status is not None and status.state is MediaJobState.FAILED and status.reason == "bug"
    store.close()


def test_a_reply_waits_for_a_file_through_all_its_download_attempts(tmp_path: Path) -> None:
    """Three 30 s attempts and their backoff take ~93 s: a reply that gave up at 70 s sent the unavailable
    reply for a file a retry was about to get. The wait stays under WAHA's 180 s file lifetime."""
    now = [1_700_000_000.0]
    store = StateStore(str(tmp_path / "state.db"), clock=lambda: now[0])
    store.initialize()
    message = classify(wp.media_message("WEBJS", kind="audio"))
    store.accept(message)
    voice = media_bytes("voice_note.ogg")
    turns = MediaTurns(store=store, settings=settings(tmp_path), input_kinds=None)
    assert turns.wait_seconds < 180

    async def one_second_later(seconds: float) -> None:
        now[0] += 1.0
        if now[0] - 1_700_000_000.0 in (1.0, 32.0, 64.0):  # attempts 1 and 2 time out, the third gets the file
            (job,) = store.claim_media_jobs("w1", limit=1, lease_seconds=45)
            if job.attempts < 3:
                store.fail_media_job(job.key, "w1", reason="timeout", retry_in=float(job.attempts))
        if now[0] - 1_700_000_000.0 == 95.0:
            assert store.store_media_job(message.dedupe_key, "w1", mimetype="audio/ogg", data=voice,
                                         max_total_bytes=10**6)

    async def run() -> Any:
        return await media_fetch.await_stored(store, message.dedupe_key, wait_seconds=turns.wait_seconds,
                                              sleep=one_second_later, clock=lambda: now[0])

    assert asyncio.run(run()) == media_fetch.StoredMedia(size=len(voice))
    store.close()


# --- what the LLM gets ----------------------------------------------------------------------------------

def test_content_parts_follow_openrouters_multimodal_format() -> None:
    voice, photo, pdf = media_bytes("voice_note.ogg"), media_bytes("sticker.webp"), media_bytes("boleto.pdf")
    audio = content_part(MediaKind.AUDIO, mimetype="audio/ogg; codecs=opus", data=voice)
    assert audio == {"type": "input_audio", "input_audio": {"data": base64.b64encode(voice).decode(), "format": "ogg"}}
    image = content_part(MediaKind.IMAGE, mimetype="image/webp", data=photo)
    assert image["image_url"]["url"] == "data:image/webp;base64," + base64.b64encode(photo).decode()
    document = content_part(MediaKind.PDF, mimetype="application/pdf", data=pdf, filename="../../boleto\n.pdf")
    assert document["file"]["filename"] == "boleto_.pdf"
    assert document["file"]["file_data"] == "data:application/pdf;base64," + base64.b64encode(pdf).decode()


def test_the_models_input_kinds_come_from_get_models() -> None:
    listing = {"data": [{"id": "m/audio", "architecture": {"input_modalities": ["text", "image", "audio"]}},
                        {"id": "m/plain"}]}
    assert input_kinds_of(listing, "m/audio") == {"text", "image", "audio"}
    assert input_kinds_of(listing, "m/plain") is None and input_kinds_of({"oops": 1}, "m/audio") is None


# --- the note for the history ----------------------------------------------------------------------------

def test_the_note_is_taken_out_of_the_reply() -> None:
    noted = strip_media_note("Abrimos das 8h às 18h.\n[[nota]]qual o horário de vocês?[[/nota]]")
    assert noted.text == "Abrimos das 8h às 18h." and noted.note == "qual o horário de vocês?"


@pytest.mark.parametrize("reply, text, note", [
    ("Abrimos às 8h. [[nota]]qual o horário", "Abrimos às 8h.", "qual o horário"),  # never closed
    ("[[ NOTA ]]foto de um tênis[[ /nota ]]\nCusta R$ 99.", "Custa R$ 99.", "foto de um tênis"),
    ("Custa R$ 99. [[/nota]]", "Custa R$ 99.", None),  # a stray closing tag
    ("Sem nota.", "Sem nota.", None),
    ("[[nota]]só a nota[[/nota]]", "", "só a nota"),  # nothing left to send: the pipeline sends the fallback
])
def test_a_malformed_note_can_lose_the_note_but_never_leak_it(reply: str, text: str, note: str | None) -> None:
    noted = strip_media_note(reply)
    assert (noted.text, noted.note) == (text, note)


@pytest.mark.parametrize("reply, text", [
    ("[[[[/nota]]nota]]", ""),  # found by hypothesis: removing the inner tag joined the outer one
    ("Oi [[[[[[/nota]]/nota]]nota]] tchau", "Oi  tchau"),
    ("[" * 40 + "[[/nota]]" * 1 + "nota]]" * 20, None),
])
def test_removing_a_stray_tag_never_leaves_a_new_one(reply: str, text: str | None) -> None:
    shown = strip_media_note(reply).text
    assert "[[nota]]" not in shown.lower().replace(" ", "") and "[[/nota]]" not in shown.lower().replace(" ", "")
    if text is not None:
        assert shown == text



@given(st.lists(st.sampled_from(["[[nota]]", "[[/nota]]", "[[ Nota]]", "oi ", "[[", "]]", "nota", "\n", "/"]),
                max_size=12))
def test_no_reply_ever_shows_a_note_marker(pieces: list[str]) -> None:
    shown = strip_media_note("".join(pieces)).text.lower().replace(" ", "")
    assert "[[nota]]" not in shown and "[[/nota]]" not in shown


# --- media bytes held by the replies being written ------------------------------------------------------

def test_the_budget_makes_a_reply_wait_until_the_files_before_it_are_let_go() -> None:
    async def run() -> list[str]:
        budget, order = MediaBudget(limit=100), []

        async def reply(name: str, size: int, hold: float) -> None:
            await budget.reserve(size)
            order.append(f"{name} in (held {budget.held})")
            await asyncio.sleep(hold)
            await budget.release(size)

        await asyncio.gather(reply("a", 60, 0.05), reply("b", 60, 0.0), reply("c", 30, 0.0))
        assert budget.held == 0 and budget.peak <= 100
        return order

    assert asyncio.run(run()) == ["a in (held 60)", "c in (held 90)", "b in (held 60)"]


def test_a_file_bigger_than_the_budget_still_goes_through_alone() -> None:
    async def run() -> int:
        budget = MediaBudget(limit=100)
        await budget.reserve(500)
        peak = budget.held
        await budget.release(500)
        return peak

    assert asyncio.run(run()) == 500


def test_a_log_line_never_carries_a_files_base64_even_inside_an_upstreams_error(caplog) -> None:
    import logging

    from whatsapp_webhook.logs import TextLogFormatter, log
    encoded = base64.b64encode(media_bytes("product.jpg")).decode()
    with caplog.at_level(logging.INFO, logger=log.name):
        log.error("llm_failed=%s", f'400 "invalid image: data:image/jpeg;base64,{encoded}"')
    line = TextLogFormatter().format(caplog.records[-1])
    assert encoded[:256] not in line and f"<{len(encoded)} base64 characters left out>" in line


UPSTREAM_ERROR = '400 "invalid image: data:image/jpeg;base64,' + base64.b64encode(bytes(range(256))).decode()
LONG_RUN = re.compile(r"[A-Za-z0-9+/]{64,}")


@pytest.mark.parametrize("formatter", ["text", "json"])
def test_base64_in_a_cut_upstream_error_a_json_field_or_an_exception_is_left_out(caplog, formatter: str) -> None:
    import json
    import logging

    from whatsapp_webhook.logs import JsonLogFormatter, MessageLog, TextLogFormatter, log
    cut = UPSTREAM_ERROR[:200]  # upstream errors are logged cut to 200 characters
    assert LONG_RUN.search(cut)
    with caplog.at_level(logging.INFO, logger=log.name):
        MessageLog(log, chat="5511@c.us").warning("decision=%(decision)s error=%(error)s",
                                                 {"decision": "llm_failed", "error": cut})
        try:
            raise ValueError(cut)
        except ValueError:
            log.exception("llm request failed")
    format_line = (TextLogFormatter() if formatter == "text" else JsonLogFormatter()).format
    field_line, exception_line = (format_line(record) for record in caplog.records[-2:])
    for line in (field_line, exception_line):
        assert LONG_RUN.search(line) is None and "base64 characters left out" in line
    if formatter == "json":
        document = json.loads(field_line)
        assert document["decision"] == "llm_failed" and "base64 characters left out" in document["error"]
        assert "base64 characters left out" in json.loads(exception_line)["exception"]
