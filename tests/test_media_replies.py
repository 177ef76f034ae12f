"""Customers' media answered through the whole app (Flask test client), WAHA and the LLM faked by respx:
the parts the LLM gets, bursts, the fixed replies, the note kept in history, groups, metrics and logs."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY

from fakes import waha_payloads as wp
from tests.conftest import completion, post_event
from whatsapp_webhook.texts import (
    DEFAULT_FALLBACK_MESSAGE,
    DEFAULT_MEDIA_UNAVAILABLE_REPLY,
    DEFAULT_MEDIA_UNSUPPORTED_REPLY,
)

MEDIA = Path(__file__).resolve().parent.parent / "fakes" / "data" / "media"
VOICE = (MEDIA / "voice_note.ogg").read_bytes()
PHOTO = (MEDIA / "product.jpg").read_bytes()
STICKER = (MEDIA / "sticker.webp").read_bytes()
PDF = (MEDIA / "boleto.pdf").read_bytes()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def last_user_content(upstreams: Any, call: int = -1) -> Any:
    return upstreams.calls_to("llm")[call]["messages"][-1]["content"]


def wait_for_replies(upstreams: Any, count: int, timeout: float = 10.0) -> list[str]:
    give_up = time.monotonic() + timeout
    while len(upstreams.sent_texts()) < count and time.monotonic() < give_up:
        time.sleep(0.05)
    return [t["text"] for t in upstreams.sent_texts()]


def answer_with(upstreams: Any, text: str) -> None:
    upstreams.llm.side_effect = lambda request: httpx.Response(200, json=completion(text))


@pytest.mark.parametrize("engine", wp.ENGINES)
def test_a_voice_note_goes_to_the_llm_as_ogg_audio_and_is_answered(client, upstreams, engine: str) -> None:
    received = metric("webhook_media_received_total", kind="audio")
    downloaded = metric("webhook_media_bytes_downloaded_total")
    envelope = wp.media_message(engine, kind="audio")
    upstreams.serve_media(envelope, VOICE, "audio/ogg")
    response = post_event(client, envelope)
    assert response.get_json()["result"]["status"] == "success"
    assert wait_for_replies(upstreams, 1) == ["Echo: <input_audio>"]
    (part,) = last_user_content(upstreams)
    assert part == {"type": "input_audio", "input_audio": {"data": b64(VOICE), "format": "ogg"}}
    (file_request,) = upstreams.media.calls
    assert file_request.request.url.host == "waha.test"  # WAHA's localhost URL, fetched from WAHA_BASE_URL
    assert file_request.request.headers["X-Api-Key"] == "test-waha-key"
    system = upstreams.calls_to("llm")[0]["messages"][0]["content"]
    assert "[[nota]]" in system  # the model is asked for the note the history keeps
    assert metric("webhook_media_received_total", kind="audio") == received + 1
    assert metric("webhook_media_bytes_downloaded_total") == downloaded + len(VOICE)


@pytest.mark.parametrize("kind, data, expected", [
    ("sticker", STICKER, {"type": "image_url", "image_url": {"url": "data:image/webp;base64," + b64(STICKER)}}),
    ("document", PDF, {"type": "file", "file": {"filename": "boleto.pdf",
                                                "file_data": "data:application/pdf;base64," + b64(PDF)}}),
])
def test_stickers_and_pdfs_are_sent_as_their_parts(client, upstreams, kind: str, data: bytes, expected: dict) -> None:
    envelope = wp.media_message("NOWEB", kind=kind, filename="boleto.pdf")
    upstreams.serve_media(envelope, data)
    post_event(client, envelope)
    assert last_user_content(upstreams) == [expected]
    assert len(wait_for_replies(upstreams, 1)) == 1


def test_a_photo_then_a_question_within_the_debounce_is_one_llm_call_in_send_order(make_app, upstreams) -> None:
    client = make_app(debounce_seconds=1.0, webhook_sync_wait_seconds=0).test_client()
    photo = wp.media_message("GOWS", kind="image", timestamp=1_764_000_000)
    upstreams.serve_media(photo, PHOTO, "image/jpeg")
    assert post_event(client, photo).status_code == 202
    assert post_event(client, wp.text_message("GOWS", body="quanto custa?", timestamp=1_764_000_001)).status_code == 202
    assert wait_for_replies(upstreams, 1) == ["Echo: <image_url> quanto custa?"]
    time.sleep(1.5)
    assert len(upstreams.sent_texts()) == 1 and upstreams.llm.call_count == 1
    image, text = last_user_content(upstreams)
    assert image["image_url"]["url"] == "data:image/jpeg;base64," + b64(PHOTO)
    assert text == {"type": "text", "text": "quanto custa?"}


def test_a_voice_note_two_photos_and_a_text_in_one_burst_are_one_call_in_send_order(make_app, upstreams) -> None:
    client = make_app(debounce_seconds=1.0, webhook_sync_wait_seconds=0).test_client()
    base = 1_764_000_100
    burst = [wp.media_message("WEBJS", kind="audio", timestamp=base),
             wp.media_message("WEBJS", kind="image", timestamp=base + 1),
             wp.media_message("WEBJS", kind="sticker", timestamp=base + 2),
             wp.text_message("WEBJS", body="e então?", timestamp=base + 3)]
    for envelope, data in zip(burst, (VOICE, PHOTO, STICKER, None)):
        if data is not None:
            upstreams.serve_media(envelope, data)
        assert post_event(client, envelope).status_code == 202
    assert wait_for_replies(upstreams, 1) == ["Echo: <input_audio> <image_url> <image_url> e então?"]
    time.sleep(1.5)
    assert upstreams.llm.call_count == 1 and len(upstreams.sent_texts()) == 1
    parts = last_user_content(upstreams)
    assert parts[0]["input_audio"]["data"] == b64(VOICE)
    assert parts[1]["image_url"]["url"].endswith(b64(PHOTO)) and parts[2]["image_url"]["url"].endswith(b64(STICKER))


def test_an_expired_file_gets_the_unavailable_reply_and_no_llm_call(client, upstreams, caplog) -> None:
    failures = metric("webhook_media_failures_total", reason="not_found")
    post_event(client, wp.media_message("WEBJS", kind="audio"))  # not served: WAHA answers 404
    assert wait_for_replies(upstreams, 1) == [DEFAULT_MEDIA_UNAVAILABLE_REPLY]
    assert upstreams.llm.call_count == 0
    assert metric("webhook_media_failures_total", reason="not_found") == failures + 1
    assert "decision=media_unavailable kind=audio reason=not_found" in caplog.text


@pytest.mark.parametrize("options", [{"download": False}, {"media_error": {"message": "Failed to download"}}])
def test_a_file_waha_has_not_got_gets_the_unavailable_reply(client, upstreams, options: dict) -> None:
    post_event(client, wp.media_message("GOWS", kind="image", **options))
    assert wait_for_replies(upstreams, 1) == [DEFAULT_MEDIA_UNAVAILABLE_REPLY]
    assert upstreams.llm.call_count == 0 and upstreams.media.call_count == 0


@pytest.mark.parametrize("mimetype", ["video/mp4", "application/vnd.openxmlformats-officedocument.wordprocessingml"])
def test_video_and_other_documents_get_the_unsupported_reply_without_a_download(client, upstreams, mimetype) -> None:
    post_event(client, wp.media_message("WEBJS", kind="document", mimetype=mimetype, filename="x.docx"))
    assert wait_for_replies(upstreams, 1) == [DEFAULT_MEDIA_UNSUPPORTED_REPLY]
    time.sleep(1.5)  # the media queue is polled every second
    assert upstreams.llm.call_count == 0 and upstreams.media.call_count == 0


def burst(client: Any, *envelopes: dict[str, Any]) -> None:
    for envelope in envelopes:
        assert post_event(client, envelope).status_code == 202


def test_a_video_with_a_question_gets_the_question_answered_and_the_model_told_of_the_video(
        make_app, upstreams) -> None:
    client = make_app(debounce_seconds=1.0, webhook_sync_wait_seconds=0).test_client()
    burst(client, wp.media_message("WEBJS", kind="document", mimetype="video/mp4", filename="v.mp4",
                                   timestamp=1_764_000_200),
          wp.text_message("WEBJS", body="tem na cor azul?", timestamp=1_764_000_201))
    assert wait_for_replies(upstreams, 1) == ["Echo: [o cliente enviou um vídeo, que não consigo ver] tem na cor azul?"]
    assert last_user_content(upstreams) == [
        {"type": "text", "text": "[o cliente enviou um vídeo, que não consigo ver]"},
        {"type": "text", "text": "tem na cor azul?"}]
    assert upstreams.llm.call_count == 1 and upstreams.media.call_count == 0


def test_an_expired_file_beside_a_usable_photo_and_a_text_still_gets_one_answer(make_app, upstreams) -> None:
    client = make_app(debounce_seconds=1.0, webhook_sync_wait_seconds=0).test_client()
    base = 1_764_000_300
    photo = wp.media_message("GOWS", kind="image", timestamp=base)
    upstreams.serve_media(photo, PHOTO, "image/jpeg")
    expired = wp.media_message("GOWS", kind="audio", timestamp=base + 1)  # not served: WAHA answers 404
    burst(client, photo, expired, wp.text_message("GOWS", body="quanto custa?", timestamp=base + 2))
    assert wait_for_replies(upstreams, 1) == [
        "Echo: <image_url> [o cliente enviou um áudio que não está mais disponível] quanto custa?"]
    image, gone, text = last_user_content(upstreams)
    assert image["image_url"]["url"] == "data:image/jpeg;base64," + b64(PHOTO)
    assert gone == {"type": "text", "text": "[o cliente enviou um áudio que não está mais disponível]"}
    assert text == {"type": "text", "text": "quanto custa?"}


def test_a_burst_with_nothing_usable_gets_the_fixed_reply(make_app, upstreams) -> None:
    client = make_app(debounce_seconds=1.0, webhook_sync_wait_seconds=0).test_client()
    burst(client, wp.media_message("NOWEB", kind="document", mimetype="video/mp4", timestamp=1_764_000_400),
          wp.media_message("NOWEB", kind="audio", timestamp=1_764_000_401))  # expired
    assert wait_for_replies(upstreams, 1) == [DEFAULT_MEDIA_UNAVAILABLE_REPLY]
    assert upstreams.llm.call_count == 0


def test_a_kind_the_model_does_not_take_gets_the_unsupported_reply(make_app, upstreams) -> None:
    upstreams.models.side_effect = lambda request: httpx.Response(200, json={"data": [
        {"id": "google/gemini-3.1-flash-lite", "architecture": {"input_modalities": ["text", "image"]}}]})
    client = make_app().test_client()
    voice = wp.media_message("WEBJS", kind="audio")
    upstreams.serve_media(voice, VOICE)
    post_event(client, voice)
    assert wait_for_replies(upstreams, 1) == [DEFAULT_MEDIA_UNSUPPORTED_REPLY]
    photo = wp.media_message("WEBJS", kind="image")
    upstreams.serve_media(photo, PHOTO)
    post_event(client, photo)
    assert wait_for_replies(upstreams, 2)[1] == "Echo: <image_url>"


def test_bytes_that_are_not_what_the_mimetype_says_get_the_unavailable_reply(client, upstreams) -> None:
    envelope = wp.media_message("NOWEB", kind="document")
    upstreams.serve_media(envelope, PHOTO)  # a JPEG named as a PDF
    post_event(client, envelope)
    assert wait_for_replies(upstreams, 1) == [DEFAULT_MEDIA_UNAVAILABLE_REPLY]


def test_a_file_over_the_cap_gets_the_unavailable_reply(make_app, upstreams) -> None:
    client = make_app(media_max_bytes=4096).test_client()
    envelope = wp.media_message("WEBJS", kind="audio")
    upstreams.serve_media(envelope, VOICE)  # 8 KB
    post_event(client, envelope)
    assert wait_for_replies(upstreams, 1) == [DEFAULT_MEDIA_UNAVAILABLE_REPLY]


def test_a_media_url_on_another_host_is_never_fetched(client, upstreams) -> None:
    other = upstreams.router.get(url__regex=r"http://files\.evil\.test/.*", name="evil")
    envelope = wp.media_message("WEBJS", kind="image")
    envelope["payload"]["media"]["url"] = "http://files.evil.test/api/files/default/x.jpeg"
    post_event(client, envelope)
    assert wait_for_replies(upstreams, 1) == [DEFAULT_MEDIA_UNAVAILABLE_REPLY]
    assert other.call_count == 0 and upstreams.media.call_count == 0


def test_a_media_url_naming_another_waha_endpoint_is_never_fetched_with_the_key(client, upstreams) -> None:
    screenshot = upstreams.router.get(url__regex=r".*/api/screenshot.*", name="screenshot").respond(
        200, content=PHOTO, headers={"Content-Type": "image/jpeg"})
    envelope = wp.media_message("WEBJS", kind="image")
    envelope["payload"]["media"]["url"] = "http://localhost:3000/api/screenshot?session=default"
    post_event(client, envelope)
    assert wait_for_replies(upstreams, 1) == [DEFAULT_MEDIA_UNAVAILABLE_REPLY]
    assert screenshot.call_count == 0 and upstreams.llm.call_count == 0


def test_the_next_turn_remembers_the_transcript_not_the_bytes(client, upstreams) -> None:
    answer_with(upstreams, "Abrimos das 8h às 18h.\n[[nota]]qual o horário de vocês?[[/nota]]")
    voice = wp.media_message("WEBJS", kind="audio")
    upstreams.serve_media(voice, VOICE)
    post_event(client, voice)
    assert wait_for_replies(upstreams, 1) == ["Abrimos das 8h às 18h."]  # the note never reaches the customer
    answer_with(upstreams, "No sábado abrimos das 9h às 13h.")
    post_event(client, wp.text_message("WEBJS", body="e no sábado?"))
    second = upstreams.calls_to("llm")[1]["messages"]
    assert second[1:] == [
        {"role": "user", "content": "[áudio]\n(conteúdo da mídia: qual o horário de vocês?)"},
        {"role": "assistant", "content": "Abrimos das 8h às 18h."},
        {"role": "user", "content": "e no sábado?"},
    ]
    assert b64(VOICE)[:40] not in json.dumps(second) and "base64" not in json.dumps(second)


def test_without_a_note_the_history_keeps_the_fixed_stand_in(client, upstreams) -> None:
    answer_with(upstreams, "Que foto bonita! [[nota]")  # malformed: no note
    photo = wp.media_message("WEBJS", kind="image", caption="gostou?")
    upstreams.serve_media(photo, PHOTO)
    post_event(client, photo)
    assert wait_for_replies(upstreams, 1) == ["Que foto bonita! [[nota]"]
    post_event(client, wp.text_message("WEBJS", body="e aí?"))
    assert upstreams.calls_to("llm")[1]["messages"][1] == {"role": "user", "content": "[imagem]\ngostou?"}


def test_a_note_in_a_reply_to_plain_text_never_reaches_the_customer(client, upstreams) -> None:
    answer_with(upstreams, "Custa R$ 99.\n[[nota]]o cliente perguntou o preço da foto anterior[[/nota]]")
    post_event(client, wp.text_message("WEBJS", body="quanto custa?"))
    assert wait_for_replies(upstreams, 1) == ["Custa R$ 99."]
    answer_with(upstreams, "De nada!")
    post_event(client, wp.text_message("WEBJS", body="obrigado"))
    assert upstreams.calls_to("llm")[1]["messages"][2] == {"role": "assistant", "content": "Custa R$ 99."}


def test_a_reply_that_is_only_a_note_gets_the_fallback(client, upstreams) -> None:
    answer_with(upstreams, "[[nota]]foto de um produto[[/nota]]")
    photo = wp.media_message("WEBJS", kind="image")
    upstreams.serve_media(photo, PHOTO)
    post_event(client, photo)
    assert wait_for_replies(upstreams, 1) == [DEFAULT_FALLBACK_MESSAGE]  # nothing left to send once the note goes
    assert upstreams.llm.call_count == 1


def test_media_in_a_group_is_understood_only_when_the_bot_is_addressed(make_app, upstreams) -> None:
    client = make_app(reply_in_groups=True).test_client()
    me = {"id": wp.BOT_ID, "lid": wp.BOT_LID, "pushName": "Bot"}
    chatter = wp.media_message("NOWEB", kind="image", group=wp.GROUP_ID, sender=wp.CUSTOMER_LID, me=me)
    assert post_event(client, chatter).get_json()["reason"] == "group_not_addressed"
    addressed = wp.media_message("NOWEB", kind="image", group=wp.GROUP_ID, sender=wp.CUSTOMER_LID, me=me,
                                 caption="@" + wp.BOT_ID.split("@")[0] + " quanto custa?")
    upstreams.serve_media(addressed, PHOTO)
    post_event(client, addressed)
    (sent,) = upstreams.sent_texts()
    assert sent["chatId"] == wp.GROUP_ID and sent["text"].startswith("Echo: <image_url>")
    assert upstreams.media.call_count == 1  # the unaddressed photo was never downloaded


def test_the_log_never_holds_the_bytes_or_their_base64(client, upstreams, caplog) -> None:
    for kind, data in (("audio", VOICE), ("image", PHOTO)):
        envelope = wp.media_message("WEBJS", kind=kind)
        upstreams.serve_media(envelope, data)
        post_event(client, envelope)
    wait_for_replies(upstreams, 2)
    assert f"media stored: kind=audio bytes={len(VOICE)}" in caplog.text
    for data in (VOICE, PHOTO):
        assert b64(data)[100:140] not in caplog.text


def test_with_media_off_nothing_is_downloaded(make_app, upstreams) -> None:
    client = make_app(media_enabled=False).test_client()
    post_event(client, wp.media_message("WEBJS", kind="audio"))
    assert upstreams.media.call_count == 0


def test_a_model_that_cannot_take_the_file_fails_that_reply_only_not_the_model(client, upstreams, caplog) -> None:
    """OpenRouter answers 404 "No endpoints found that support input audio" for a served model without audio
    endpoints: that voice note gets the fallback, and the model keeps answering texts (not marked as retired)."""
    def answer(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if isinstance(body["messages"][-1]["content"], list):
            return httpx.Response(404, json={"error": {"code": 404, "message":
                                                       "No endpoints found that support input audio"}})
        return httpx.Response(200, json=completion("Oi!", model=body["model"]))

    upstreams.llm.side_effect = answer
    retired = metric("webhook_llm_model_unavailable_total", model="google/gemini-3.1-flash-lite")
    voice = wp.media_message("WEBJS", kind="audio")
    upstreams.serve_media(voice, VOICE)
    post_event(client, voice)
    assert wait_for_replies(upstreams, 1) == [DEFAULT_FALLBACK_MESSAGE]
    assert metric("webhook_llm_model_unavailable_total", model="google/gemini-3.1-flash-lite") == retired
    assert "model_unavailable" not in caplog.text and "no configured model is served" not in json.dumps(
        client.get("/health").get_json())
    post_event(client, wp.text_message("WEBJS", body="oi"))
    assert wait_for_replies(upstreams, 2)[1] == "Oi!"
