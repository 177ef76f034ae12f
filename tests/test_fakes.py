"""Quick checks of the fake upstreams themselves (they are the ground truth for the end-to-end tests)."""
from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fakes import FakeOpenRouter, FakeWaha, validate_waha_request

WAHA_KEY = {"X-Api-Key": "test-waha-key"}
LLM_KEY = {"Authorization": "Bearer test-llm-key"}
TEXT = {"session": "default", "chatId": "22222222222@c.us", "text": "hello"}
CHAT = {"model": "google/gemini-3.1-flash-lite",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!"}]}


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5) as c:
        yield c


@pytest.fixture
def waha() -> Iterator[FakeWaha]:
    with FakeWaha() as fake:
        yield fake


@pytest.fixture
def llm() -> Iterator[FakeOpenRouter]:
    with FakeOpenRouter() as fake:
        yield fake


def completion(client: httpx.Client, llm: FakeOpenRouter) -> httpx.Response:
    return client.post(f"{llm.url}/api/v1/chat/completions", json=CHAT, headers=LLM_KEY)


def test_auth_errors(waha: FakeWaha, llm: FakeOpenRouter, client: httpx.Client) -> None:
    assert client.get(f"{waha.url}/ping").json() == {"message": "pong"}
    r = client.post(f"{waha.url}/api/sendText", json=TEXT, headers={"X-Api-Key": "wrong"})
    assert (r.status_code, r.json()) == (401, {"message": "Unauthorized", "statusCode": 401})
    r = client.post(f"{llm.url}/api/v1/chat/completions", json=CHAT)
    assert (r.status_code, r.json()["error"]["code"]) == (401, 401)
    assert waha.sent_texts() == [] and len(llm.completions()) == 1


def test_schema_validation(waha: FakeWaha, client: httpx.Client) -> None:
    body = {k: v for k, v in TEXT.items() if k != "session"}
    r = client.post(f"{waha.url}/api/sendText", json=body, headers=WAHA_KEY)
    assert r.status_code == 400 and r.json()["error"] == "Bad Request"
    assert any("session" in m for m in r.json()["message"])
    assert validate_waha_request("/api/sendText", {**TEXT, "reply_to": "false_1@c.us_AAA"}) == []
    assert validate_waha_request("/api/sendSeen", {"session": "default", "chatId": 5}) != []
    assert waha.sent_texts() == []


def test_session_not_working(client: httpx.Client) -> None:
    with FakeWaha(session_status="STARTING") as waha:
        r = client.post(f"{waha.url}/api/sendText", json=TEXT, headers=WAHA_KEY)
        assert r.status_code == 422 and r.json()["expected"] == ["WORKING"]
        waha.session_status = "WORKING"
        r = client.post(f"{waha.url}/api/sendText", json={**TEXT, "session": "other"}, headers=WAHA_KEY)
        assert r.status_code == 422 and r.json()["session"] == "other"


def test_one_waha_can_serve_several_numbers(client: httpx.Client) -> None:
    # WAHA Plus runs one session per WhatsApp number; SESSIONS_FILE configures each.
    with FakeWaha(other_sessions=("loja2",)) as waha:
        r = client.post(f"{waha.url}/api/sendText", json={**TEXT, "session": "loja2"}, headers=WAHA_KEY)
        assert r.status_code == 201 and waha.delivered_texts()[-1]["session"] == "loja2"
        assert client.get(f"{waha.url}/api/sessions/loja2", headers=WAHA_KEY).json()["status"] == "WORKING"
        r = client.post(f"{waha.url}/api/sendText", json={**TEXT, "session": "loja3"}, headers=WAHA_KEY)
        assert r.status_code == 422 and r.json()["status"] == "STOPPED"


@pytest.mark.parametrize("engine", ["WEBJS", "NOWEB", "GOWS", "WEBJS_EMPTY"])
def test_engine_shaped_send_text(engine: str, client: httpx.Client) -> None:
    with FakeWaha(engine=engine) as waha:
        r = client.post(f"{waha.url}/api/sendText", json={**TEXT, "reply_to": "false_x@c.us_AAA"}, headers=WAHA_KEY)
        assert r.status_code == 201
        if engine == "WEBJS":
            assert r.json()["id"]["_serialized"].startswith("true_22222222222@c.us_3EB0")
        elif engine == "NOWEB":
            assert r.json()["key"]["remoteJid"] == "22222222222@s.whatsapp.net"
            assert r.json()["message"]["extendedTextMessage"]["text"] == "hello"
        elif engine == "GOWS":
            assert r.json()["id"].startswith("true_22222222222@c.us_3EB0")
        else:
            assert r.content == b""
        for path in ("/api/sendSeen", "/api/startTyping", "/api/stopTyping"):
            assert client.post(waha.url + path, json=TEXT, headers=WAHA_KEY).status_code == 201
        assert waha.sent_texts() == [{**TEXT, "reply_to": "false_x@c.us_AAA"}]
        assert [p for p, _ in waha.presence_calls("22222222222@c.us")] == ["/api/sendSeen", "/api/startTyping",
                                                                         "/api/stopTyping"]


def test_llm_echo_and_models(llm: FakeOpenRouter, client: httpx.Client) -> None:
    body = completion(client, llm).json()
    assert body["choices"][0]["message"]["content"] == "Echo: Hi there!"
    assert body["model"] == CHAT["model"] and body["id"].startswith("gen-")
    listed = client.get(f"{llm.url}/api/v1/models").json()["data"]
    assert [m["id"] for m in listed] == list(llm.models) == ["google/gemini-3.1-flash-lite", "google/gemini-3.5-flash"]
    assert all("audio" in m["architecture"]["input_modalities"] for m in listed)
    assert body["usage"]["cost"] == pytest.approx(body["usage"]["total_tokens"] * 1e-6)


def test_llm_answers_unserved_models_like_openrouter(llm: FakeOpenRouter, client: httpx.Client) -> None:
    def ask(**fields: object) -> httpx.Response:
        return client.post(f"{llm.url}/api/v1/chat/completions", json={**CHAT, **fields}, headers=LLM_KEY)

    retired = ask(model="google/gemini-2.0-flash-001")
    assert (retired.status_code, retired.json()["error"]["message"]) == (
        404, "No endpoints found for google/gemini-2.0-flash-001.")
    unknown = ask(model="google/gemini-9-ultra")
    assert (unknown.status_code, unknown.json()["error"]["message"]) == (
        400, "google/gemini-9-ultra is not a valid model ID")
    # `models` is tried in order; the answer names the model that served it.
    fallback = ask(model="google/gemini-2.0-flash-001",
                   models=["google/gemini-2.0-flash-001", "google/gemini-3.5-flash"])
    assert (fallback.status_code, fallback.json()["model"]) == (200, "google/gemini-3.5-flash")
    none_served = ask(models=["google/gemini-2.5-flash", "google/gemini-2.0-flash-001"])
    assert none_served.status_code == 404


def test_llm_custom_reply(client: httpx.Client) -> None:
    with FakeOpenRouter(reply=lambda text: f"Resposta para: {text}") as llm:
        body = completion(client, llm).json()
    assert body["choices"][0]["message"]["content"] == "Resposta para: Hi there!"


def test_faults_consumed_in_order(llm: FakeOpenRouter, client: httpx.Client) -> None:
    llm.add_fault("/chat/completions", status=503, times=2)
    llm.add_fault("/chat/completions", status=429, headers={"Retry-After": "1"})
    responses = [completion(client, llm) for _ in range(4)]
    assert [r.status_code for r in responses] == [503, 503, 429, 200]
    assert responses[2].headers["Retry-After"] == "1"
    assert responses[2].json()["error"]["message"] == "Rate limit exceeded"
    llm.add_fault("/chat/completions", status=502, times=None)
    assert {completion(client, llm).status_code for _ in range(3)} == {502}
    llm.clear_faults()
    assert completion(client, llm).status_code == 200


@pytest.mark.parametrize("kind", ["error_200", "finish_error", "empty_content", "null_content", "malformed"])
def test_unusable_200s(kind: str, llm: FakeOpenRouter, client: httpx.Client) -> None:
    llm.add_fault("/chat/completions", kind=kind)
    r = completion(client, llm)
    assert r.status_code == 200
    if kind == "malformed":
        with pytest.raises(json.JSONDecodeError):
            r.json()
        return
    body = r.json()
    if kind == "error_200":
        assert "choices" not in body and body["error"]["code"] == 502
    else:
        choice = body["choices"][0]
        expected = {"finish_error": "error", "empty_content": "stop", "null_content": "stop"}[kind]
        assert choice["finish_reason"] == expected
        if kind == "finish_error":  # partial content that a client must not send
            assert "Echo: Hi there!".startswith(choice["message"]["content"]) and choice["error"]["code"] == 502
        else:
            assert choice["message"]["content"] == {"empty_content": "", "null_content": None}[kind]


def test_hang_and_drop_close_without_response(llm: FakeOpenRouter, client: httpx.Client) -> None:
    llm.add_fault("/chat/completions", kind="hang", delay_s=0.1)
    llm.add_fault("/chat/completions", drop_connection=True)
    for _ in range(2):
        with pytest.raises(httpx.RemoteProtocolError):
            completion(client, llm)
    assert completion(client, llm).status_code == 200
    assert [r["status"] for r in llm.requests()] == [None, None, 200]


def test_delay_does_not_block_others(waha: FakeWaha, client: httpx.Client) -> None:
    waha.add_fault("/api/sendText", delay_s=0.4)  # delay only: normal 201 afterwards
    slow: list[float] = []

    def send() -> None:
        t0 = time.monotonic()
        assert client.post(f"{waha.url}/api/sendText", json=TEXT, headers=WAHA_KEY).status_code == 201
        slow.append(time.monotonic() - t0)

    thread = threading.Thread(target=send)
    thread.start()
    time.sleep(0.05)
    t0 = time.monotonic()
    assert client.get(f"{waha.url}/ping").status_code == 200
    assert time.monotonic() - t0 < 0.2
    thread.join()
    assert slow[0] >= 0.4 and len(waha.sent_texts()) == 1


def test_control_endpoints(waha: FakeWaha, client: httpx.Client) -> None:
    rules = {"rules": [{"path": "/api/sendText", "status": 500, "times": 1}]}
    assert client.post(f"{waha.url}/_fake/faults", json=rules).json()["added"] == 1
    assert client.post(f"{waha.url}/_fake/faults", json={"rules": [{"path": "/x", "kind": "nope"}]}).status_code == 400
    r = client.post(f"{waha.url}/api/sendText", json=TEXT, headers=WAHA_KEY)
    assert r.status_code == 500 and r.json()["exception"]["name"] == "Error"
    assert client.post(f"{waha.url}/api/sendText", json=TEXT, headers=WAHA_KEY).status_code == 201
    recorded = client.get(f"{waha.url}/_fake/requests", params={"path": "/api/sendText"}).json()["requests"]
    assert [r["status"] for r in recorded] == [500, 201] and recorded[0]["headers"]["x-api-key"] == "test-waha-key"
    client.post(f"{waha.url}/_fake/faults", json={"rules": [{"path": "/ping", "status": 503, "times": None}]})
    assert client.delete(f"{waha.url}/_fake/faults").status_code == 200
    assert client.post(f"{waha.url}/_fake/config", json={"latency_s": 0.05}).json()["latency_s"] == 0.05
    assert client.post(f"{waha.url}/_fake/config", json={"bogus": 1}).status_code == 400
    assert client.post(f"{waha.url}/_fake/reset").status_code == 200
    assert client.get(f"{waha.url}/ping").status_code == 200 and len(waha.requests()) == 1


def test_log_file_and_malformed_requests(tmp_path: Path, client: httpx.Client) -> None:
    log = tmp_path / "waha.jsonl"
    with FakeWaha(log_path=str(log)) as waha:
        with socket.create_connection(("127.0.0.1", waha.port)) as s:  # garbage request line
            s.sendall(b"\x00\x01 NOT HTTP\r\n\r\n")
            s.recv(1024)
        r = client.post(f"{waha.url}/api/sendText", content=b"{not json", headers=WAHA_KEY)
        assert r.status_code == 400
        assert client.post(f"{waha.url}/api/sendText", json=TEXT, headers=WAHA_KEY).status_code == 201
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(line["path"], line["status"]) for line in lines] == [("/api/sendText", 400), ("/api/sendText", 201)]


# --- media: the fake WAHA's /api/files and the fake LLM's content-part checks ------------------------------

MEDIA_DIR = Path(__file__).resolve().parent.parent / "fakes" / "data" / "media"
VOICE = (MEDIA_DIR / "voice_note.ogg").read_bytes()
PHOTO = (MEDIA_DIR / "product.jpg").read_bytes()


def test_waha_files_need_the_key_expire_and_can_be_endless(waha: FakeWaha, client: httpx.Client) -> None:
    path = "/api/files/default/A.oga"
    waha.serve_file(path, VOICE, "audio/ogg")
    assert client.get(waha.url + path).status_code == 401
    served = client.get(waha.url + path, headers=WAHA_KEY)
    assert served.status_code == 200 and served.content == VOICE and served.headers["content-type"] == "audio/ogg"
    waha.expire_file(path)
    assert client.get(waha.url + path, headers=WAHA_KEY).status_code == 404
    assert waha.file_bytes_sent(path) == len(VOICE)
    big = "/api/files/default/B.jpeg"
    waha.serve_oversize(big, "image/jpeg", head=PHOTO, total_bytes=1_000_000)
    with client.stream("GET", waha.url + big, headers=WAHA_KEY) as response:
        assert "content-length" not in response.headers
        received = sum(len(chunk) for chunk in response.iter_bytes())
    assert received >= 1_000_000 - 65_536 and waha.file_bytes_sent(big) == received


def media_chat(*parts: dict) -> dict:
    return {"model": "google/gemini-3.1-flash-lite", "messages": [
        {"role": "system", "content": "Answer. End with [[nota]]...[[/nota]]."},
        {"role": "user", "content": list(parts)}]}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_llm_hears_a_valid_voice_note_and_sees_a_photo(llm: FakeOpenRouter, client: httpx.Client) -> None:
    body = media_chat({"type": "input_audio", "input_audio": {"data": b64(VOICE), "format": "ogg"}},
                      {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + b64(PHOTO)}},
                      {"type": "text", "text": "e isso?"})
    answer = client.post(llm.url + "/api/v1/chat/completions", json=body, headers=LLM_KEY)
    text = answer.json()["choices"][0]["message"]["content"]
    assert text.startswith("Echo: <input_audio: qual o horário de vocês?> <image_url: foto de um produto")
    assert text.endswith("e isso?\n[[nota]]qual o horário de vocês?; foto de um produto vermelho e azul com um círculo "
                         "branco[[/nota]]")
    assert [seen["kind"] for seen in llm.media_seen()] == ["input_audio", "image_url"]


@pytest.mark.parametrize("part, error", [
    ({"type": "input_audio", "input_audio": {"data": b64(VOICE), "format": "opus"}}, "format"),
    ({"type": "input_audio", "input_audio": {"data": "data:audio/ogg;base64," + b64(VOICE), "format": "ogg"}},
     "not a data URL"),
    ({"type": "input_audio", "input_audio": {"data": b64(VOICE)[:-8] + "!!!!!!!!", "format": "ogg"}}, "base64"),
    ({"type": "input_audio", "input_audio": {"data": b64(VOICE[:-1]), "format": "ogg"}}, "none of the files"),
    ({"type": "image_url", "image_url": {"url": "data:image/bmp;base64," + b64(PHOTO)}}, "mimetype"),
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(PHOTO)}}, "not image/png"),
    ({"type": "image_url", "image_url": {"url": "https://example.test/p.jpg"}}, "data: URL"),
    ({"type": "file", "file": {"file_data": "data:application/pdf;base64," + b64(PHOTO)}}, "filename"),
    ({"type": "video_url", "video_url": {"url": "x"}}, "unknown content part"),
], ids=["format", "audio-data-url", "bad-base64", "other-bytes", "image-mimetype", "image-magic", "image-http",
        "file-name", "video"])
def test_llm_refuses_parts_openrouter_would_or_bytes_waha_never_served(
        llm: FakeOpenRouter, client: httpx.Client, part: dict, error: str) -> None:
    answer = client.post(llm.url + "/api/v1/chat/completions", json=media_chat(part), headers=LLM_KEY)
    assert answer.status_code == 400 and error in answer.json()["error"]["message"]
    assert llm.media_seen() == []
