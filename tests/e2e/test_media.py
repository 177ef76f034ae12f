"""Voice notes, photos, stickers and PDFs end to end: real gunicorn, the fake WAHA serving the committed media
files at /api/files (with its API key check), the fake OpenRouter checking every content part decodes to
exactly the bytes WAHA served."""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from fakes import FakeWaha
from fakes import waha_payloads as wp
from fakes.fake_openrouter import MEDIA_CATALOG
from tests.e2e.conftest import WAHA_KEY
from tests.e2e.test_gunicorn import deliver, stats, wait_for
from whatsapp_webhook.texts import DEFAULT_MEDIA_UNAVAILABLE_REPLY, DEFAULT_MEDIA_UNSUPPORTED_REPLY

pytestmark = pytest.mark.e2e

MEDIA = Path(__file__).resolve().parents[2] / "fakes" / "data" / "media"
MIMETYPES = {"voice_note.ogg": "audio/ogg", "product.jpg": "image/jpeg", "sticker.webp": "image/webp",
             "boleto.pdf": "application/pdf"}


def file_path(envelope: dict[str, Any]) -> str:
    return urlsplit(envelope["payload"]["media"]["url"]).path


def serve(fake_waha: FakeWaha, envelope: dict[str, Any], name: str) -> bytes:
    """WAHA holds the committed file at the envelope's media.url (WAHA's default http://localhost:3000 one)."""
    data = (MEDIA / name).read_bytes()
    fake_waha.serve_file(file_path(envelope), data, MIMETYPES[name])
    return data


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def customer_texts(fake_waha: FakeWaha, chat: str) -> list[str]:
    return [t["text"] for t in fake_waha.delivered_texts() if t["chatId"] == chat]


@pytest.mark.parametrize("engine", wp.ENGINES)
def test_a_voice_note_is_heard_and_answered(server, fake_waha, fake_llm, engine: str) -> None:
    envelope = wp.media_message(engine, kind="audio")
    voice = serve(fake_waha, envelope, "voice_note.ogg")
    response = deliver(server, envelope)
    assert response.status_code == 200 and response.json()["result"]["status"] == "success", response.text
    (reply,) = customer_texts(fake_waha, envelope["payload"]["from"])
    assert reply == "Echo: <input_audio: qual o horário de vocês?>"  # and the model's [[nota]] was stripped
    assert fake_llm.media_seen() == [{"kind": "input_audio", "sha256": sha256(voice), "size": len(voice)}]
    (download,) = fake_waha.file_requests()
    assert download["headers"]["x-api-key"] == WAHA_KEY and download["status"] == 200
    # each worker said at start which files the model understands (from GET /models)
    assert 'media: "google/gemini-3.1-flash-lite understands voice notes and audio, images and stickers, PDFs' \
        in server.log_text()


def test_a_file_delivered_as_message_and_message_any_is_downloaded_once(server, fake_waha, fake_llm) -> None:
    envelope = wp.media_message("GOWS", kind="image")
    serve(fake_waha, envelope, "product.jpg")
    assert deliver(server, envelope).json()["result"]["status"] == "success"
    echo = {**envelope, "event": "message.any", "id": envelope["id"] + "x"}
    assert deliver(server, echo).json()["reason"] == "duplicate"
    assert len(fake_waha.file_requests()) == 1 and len(fake_llm.completions()) == 1


@pytest.mark.parametrize("name, kind, caption, expected", [
    ("sticker.webp", "sticker", None, "Echo: <image_url: figurinha de um rosto amarelo sorrindo>"),
    ("boleto.pdf", "document", None, "Echo: <file: boleto de R$ 123,45 com vencimento em 10/12/2026>"),
    ("product.jpg", "image", "tem em azul?", "Echo: <image_url: " + MEDIA_CATALOG["product.jpg"] + "> tem em azul?"),
], ids=["sticker", "pdf", "photo-with-caption"])
def test_stickers_pdfs_and_captions_are_understood(server, fake_waha, fake_llm, name, kind, caption, expected) -> None:
    envelope = wp.media_message("NOWEB", kind=kind, caption=caption, filename="boleto.pdf")
    data = serve(fake_waha, envelope, name)
    assert deliver(server, envelope).status_code == 200
    assert customer_texts(fake_waha, envelope["payload"]["from"]) == [expected]
    assert [seen["sha256"] for seen in fake_llm.media_seen()] == [sha256(data)]


def test_a_photo_then_a_question_is_one_llm_call_and_one_reply(start_server, fake_waha, fake_llm) -> None:
    server = start_server(DEBOUNCE_SECONDS="2", WEBHOOK_SYNC_WAIT_SECONDS="10")
    chat, base = "5521922220001@c.us", int(time.time())
    photo = wp.media_message("GOWS", kind="image", sender=chat, timestamp=base)
    question = wp.text_message("GOWS", body="quanto custa?", sender=chat, timestamp=base + 1)
    serve(fake_waha, photo, "product.jpg")
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        first = pool.submit(deliver, server, photo)
        time.sleep(0.5)
        second = pool.submit(deliver, server, question)
        statuses = sorted(f.result().json()["result"]["status"] for f in (first, second))
    assert statuses == ["merged", "success"]
    assert customer_texts(fake_waha, chat) == [f"Echo: <image_url: {MEDIA_CATALOG['product.jpg']}> quanto custa?"]
    (request,) = fake_llm.completions()
    assert [part["type"] for part in request["messages"][-1]["content"]] == ["image_url", "text"]


def test_an_expired_file_gets_the_unavailable_reply(server, fake_waha, fake_llm) -> None:
    envelope = wp.media_message("WEBJS", kind="audio")  # never served: WAHA answers 404
    assert deliver(server, envelope).json()["result"]["status"] == "media_unavailable"
    assert customer_texts(fake_waha, envelope["payload"]["from"]) == [DEFAULT_MEDIA_UNAVAILABLE_REPLY]
    assert fake_llm.completions() == []
    assert [r["status"] for r in fake_waha.file_requests()] == [404]  # not retried: the file is gone


def test_an_oversize_file_gets_the_unavailable_reply_and_is_not_read_past_the_cap(start_server, fake_waha,
                                                                                  fake_llm) -> None:
    server = start_server(MEDIA_MAX_BYTES="65536")
    envelope = wp.media_message("GOWS", kind="image")
    total = 256 * 1024 * 1024
    fake_waha.serve_oversize(file_path(envelope), "image/jpeg", head=(MEDIA / "product.jpg").read_bytes(),
                             total_bytes=total)
    assert deliver(server, envelope).json()["result"]["status"] == "media_unavailable"
    assert customer_texts(fake_waha, envelope["payload"]["from"]) == [DEFAULT_MEDIA_UNAVAILABLE_REPLY]
    wait_for(lambda: "reason=too_large" in server.log_text())
    time.sleep(0.5)
    # The server stopped reading at the cap; what left the fake beyond it sits in socket buffers at most.
    assert fake_waha.file_bytes_sent(file_path(envelope)) < 16 * 1024 * 1024
    assert fake_llm.completions() == []


def test_a_media_url_on_another_host_is_never_requested(server, fake_waha, fake_llm) -> None:
    with FakeWaha(api_key=WAHA_KEY, host="127.0.0.2") as elsewhere:
        envelope = wp.media_message("WEBJS", kind="image")
        elsewhere.serve_file(file_path(envelope), (MEDIA / "product.jpg").read_bytes(), "image/jpeg")
        envelope["payload"]["media"]["url"] = elsewhere.url + file_path(envelope)
        envelope["payload"]["mediaUrl"] = envelope["payload"]["media"]["url"]
        assert deliver(server, envelope).json()["result"]["status"] == "media_unavailable"
        assert elsewhere.requests() == []
    assert fake_waha.file_requests() == [] and "reason=refused_origin" in server.log_text()


def test_a_video_gets_the_unsupported_reply(server, fake_waha, fake_llm) -> None:
    envelope = wp.media_message("WEBJS", kind="document", mimetype="video/mp4", download=False)
    assert deliver(server, envelope).json()["result"]["status"] == "media_unsupported"
    assert customer_texts(fake_waha, envelope["payload"]["from"]) == [DEFAULT_MEDIA_UNSUPPORTED_REPLY]


def test_kill_9_after_the_message_is_recorded_the_reply_still_carries_the_media(start_server, fake_waha,
                                                                                 fake_llm) -> None:
    server = start_server(LEASE_SECONDS="2", WEBHOOK_SYNC_WAIT_SECONDS="0.5", LLM_TIMEOUT_SECONDS="60",
                          LLM_DEADLINE_SECONDS="120")
    envelope = wp.media_message("NOWEB", kind="audio")
    voice = serve(fake_waha, envelope, "voice_note.ogg")
    fake_llm.add_fault("/chat/completions", delay_s=30, times=0)  # the reply is being thought about...
    assert deliver(server, envelope).status_code == 202
    wait_for(lambda: "media stored: kind=audio" in server.log_text())
    server.pid_working_on(envelope["id"])
    os.killpg(server.process.pid, signal.SIGKILL)  # ...when the power goes
    server.process.wait()
    fake_waha.expire_file(file_path(envelope))  # and WAHA's 180 s are over by the time it is back
    fake_llm.clear_faults()
    server.start()
    chat = envelope["payload"]["from"]
    wait_for(lambda: customer_texts(fake_waha, chat), timeout=20)
    time.sleep(1.0)
    assert customer_texts(fake_waha, chat) == ["Echo: <input_audio: qual o horário de vocês?>"]
    assert fake_llm.media_seen()[-1]["sha256"] == sha256(voice)
    assert len(fake_waha.file_requests()) == 1  # downloaded once, before the kill
    counts = stats(server)
    assert counts["messages_received"] == counts["messages_processed"] + counts["messages_in_progress"]


def test_the_next_message_is_answered_with_the_transcript_not_the_audio(server, fake_waha, fake_llm) -> None:
    chat = "5521922220009@c.us"
    voice_note = wp.media_message("WEBJS", kind="audio", sender=chat)
    voice = serve(fake_waha, voice_note, "voice_note.ogg")
    assert deliver(server, voice_note).status_code == 200
    assert deliver(server, wp.text_message("WEBJS", sender=chat, body="e no sábado?")).status_code == 200
    first, second = fake_llm.completions()
    assert first["messages"][-1]["content"][0]["type"] == "input_audio"
    history = second["messages"][1:-1]
    assert history[0] == {"role": "user", "content": "[áudio]\n(conteúdo da mídia: qual o horário de vocês?)"}
    assert history[1] == {"role": "assistant", "content": "Echo: <input_audio: qual o horário de vocês?>"}
    assert second["messages"][-1] == {"role": "user", "content": "e no sábado?"}
    body = json.dumps(second)
    assert all(isinstance(m["content"], str) for m in second["messages"])  # no content parts, no bytes again
    assert "base64" not in body
    assert base64.b64encode(voice).decode()[:64] not in body
