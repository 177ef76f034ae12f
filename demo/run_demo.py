"""Demonstração sem contas: the whole flow on loopback, no WhatsApp, no WAHA, no LLM key.

    ./start_webhook_server.sh demo          (or: .venv/bin/python -m demo.run_demo [--keep])

Starts the shipped fake WAHA and a fake LLM in this process, the real server under gunicorn (2 workers)
in a temporary folder, sends signed WAHA-shaped deliveries and prints, for each one, what the customer
sent, what the webhook answered, the WAHA calls the server made, what reached the customer's WhatsApp and
the server's decision log lines; then /stats. Exits 0 only if every expected outcome happened, so CI can
use it as a smoke test. Everything is stopped on the way out, also on Ctrl-C or an error.
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import sys
import tempfile
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python demo/run_demo.py` works too
    sys.path.insert(0, str(REPO))

import httpx

from fakes import FakeOpenRouter, FakeWaha
from fakes import waha_payloads as wp
from fakes.gunicorn_server import GunicornError, GunicornServer
from whatsapp_webhook import WEBHOOK_PATH
from whatsapp_webhook.settings import DEFAULT_FALLBACK_MESSAGE

WAHA_KEY = "demo-waha-key"
LLM_KEY = "demo-llm-key"
HMAC_KEY = "demo-hmac-key"  # the server checks X-Webhook-Hmac with it, like with WAHA's hmac.key
ENGINE = "WEBJS"
LLM_ATTEMPTS = 3
MEDIA_DIR = Path(__file__).resolve().parent.parent / "fakes" / "data" / "media"
# Log lines shown per delivery: the decisions, plus the LLM retries and failure behind a fallback.
DECISION_MARKS = ("decision=", "llm attempt", "llm_failed=")


# --------------------------------------------------------------------------------------------------
# FAKE LLM. Not a model: canned Portuguese answers picked by keyword, so the transcript reads like a
# real conversation. The real server sends the same request it would send to OpenRouter.
# --------------------------------------------------------------------------------------------------
CANNED_REPLIES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("horario", "abre", "fecha"),
     "Olá! Funcionamos de segunda a sexta, das 9h às 18h, e aos sábados das 9h às 13h."),
    (("entrega", "frete"),
     "Entregamos sim! Para Campinas o prazo é de 2 dias úteis e o frete fica em R$ 15."),
    (("preco", "valor", "quanto"),
     "O preço depende do modelo. Me diga qual produto você quer que eu te passo o valor."),
)
DEFAULT_REPLY = "Olá! Sou o assistente virtual da Loja Exemplo. Como posso ajudar?"


def fake_llm_reply(text: str) -> str:
    """The fake LLM's whole brain: first canned reply whose keyword appears in the message (accents ignored)."""
    plain = unicodedata.normalize("NFKD", text.lower()).encode("ascii", "ignore").decode()
    return next((reply for words, reply in CANNED_REPLIES if any(w in plain for w in words)), DEFAULT_REPLY)


# --------------------------------------------------------------------------------------------------
# Plumbing
# --------------------------------------------------------------------------------------------------
def say(line: str = "") -> None:
    print(line, flush=True)


def short(text: str, limit: int = 110) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def server_env(waha: FakeWaha, llm: FakeOpenRouter) -> dict[str, str]:
    """The real server's settings (gunicorn, 2 workers): the fakes, HMAC on, typing shown, groups ignored.

    fakes.gunicorn_server adds a fresh STATE_DB and LOG_FILE in the temporary folder and an empty
    WEBHOOK_ENV_FILE, and keeps the user's exported settings and .env.webhook out.
    """
    return {"WAHA_BASE_URL": waha.url, "WAHA_API_KEY": WAHA_KEY,
            "OPENROUTER_BASE_URL": llm.url + "/api/v1", "OPENROUTER_API_KEY": LLM_KEY,
            "LOG_LEVEL": "INFO", "WEBHOOK_HMAC_KEY": HMAC_KEY,
            "REPLY_IN_GROUPS": "false", "TYPING_SIMULATION": "true", "WEBHOOK_SYNC_WAIT_SECONDS": "15",
            "LLM_MAX_ATTEMPTS": str(LLM_ATTEMPTS), "LLM_TIMEOUT_SECONDS": "5", "LLM_DEADLINE_SECONDS": "10",
            "WAHA_TIMEOUT_SECONDS": "5",
            # Ctrl-C in the middle of a reply: hand it back after 2 s instead of waiting 20 s.
            "GUNICORN_GRACEFUL_TIMEOUT": "12"}


@dataclass
class Step:
    """One WAHA delivery and what must come of it."""

    title: str
    envelope: dict[str, Any]
    shown: str  # what the customer did, for people
    expect_http: int
    expect_body: dict[str, Any]  # dotted path in the webhook's JSON answer -> value
    expect_log: str  # regex that one of this event's decision lines must match
    explain: str
    expect_reply: tuple[str, str] | None = None  # (chatId, text) the customer must receive; None = nothing
    llm_calls: int = 0
    before: Callable[[], None] | None = None
    after: Callable[[], None] | None = None


@dataclass
class Demo:
    waha: FakeWaha
    llm: FakeOpenRouter
    gunicorn: GunicornServer
    client: httpx.Client
    checks: list[tuple[str, bool]] = field(default_factory=list)

    def check(self, label: str, ok: bool) -> None:
        self.checks.append((label, ok))

    def report_checks(self, since: int) -> None:
        """One line when all is well; every failed expectation otherwise."""
        mine = self.checks[since:]
        failed = [label for label, ok in mine if not ok]
        if not failed:
            say(f"  [OK] como esperado ({len(mine)} verificações)")
        for label in failed:
            say(f"  [FALHOU] {label}")

    def run(self, number: int, total: int, step: Step) -> dict[str, Any]:
        env = step.envelope
        payload = env.get("payload") or {}
        say(f"=== {number}/{total} {step.title} ===")
        say(f"  >> {step.shown}")
        say(f"     evento WAHA: {env['event']}  id={env['id']}  de={payload.get('from')}"
            + (f"  participante={payload['participant']}" if payload.get("participant") else ""))
        waha_before, llm_before = len(self.waha.requests()), len(self.llm.requests())
        delivered_before = len(self.waha.delivered_texts())
        if step.before:
            step.before()
        try:
            body = wp.dumps(env)
            headers = {"Content-Type": "application/json", "X-Webhook-Request-Id": f"demo-{number}",
                       "X-Webhook-Hmac": wp.sign(body, HMAC_KEY), "X-Webhook-Hmac-Algorithm": "sha512"}
            started = time.monotonic()
            response = self.client.post(self.gunicorn.url + WEBHOOK_PATH, content=body, headers=headers)
            elapsed = time.monotonic() - started
        finally:
            if step.after:
                step.after()
        try:
            answer = response.json()
        except ValueError:
            answer = {}
        say(f"  << webhook respondeu: HTTP {response.status_code} {describe_answer(answer)}  ({elapsed:.1f} s)")

        # The worker logs its final decision just after the inbox says "done": give it a moment.
        lines = self.wait_for_log(env["id"], step.expect_log)
        new_waha = [r for r in self.waha.requests()[waha_before:]
                    if r["method"] == "POST" or r["path"].startswith("/api/files/")]
        new_llm = [r for r in self.llm.requests()[llm_before:] if r["path"].endswith("/chat/completions")]
        if new_llm:
            codes = ", ".join(str(r["status"]) for r in new_llm)
            say(f"  -> LLM (falso): {len(new_llm)} chamada(s) a /chat/completions, respostas HTTP {codes}")
        else:
            say("  -> LLM (falso): não foi consultado")
        if new_waha:
            say("  -> chamadas ao WAHA:")
            for r in new_waha:
                if r["method"] == "GET":  # the customer's file, with WAHA's key
                    key = "X-Api-Key ok" if r["headers"].get("x-api-key") == WAHA_KEY else "sem X-Api-Key"
                    say(f"       GET  {r['path']}  ({key})  -> HTTP {r['status']}")
                    continue
                say(f"       POST {r['path']:<16} chatId={r['body'].get('chatId')}  -> HTTP {r['status']}")
        else:
            say("  -> chamadas ao WAHA: nenhuma")
        delivered = self.waha.delivered_texts()[delivered_before:]
        if delivered:
            for message in delivered:
                say(f"  <- o cliente recebeu no WhatsApp ({message['chatId']}): \"{message['text']}\"")
        else:
            say("  <- o cliente não recebeu nada")
        say("  log de decisões:")
        for line in lines:
            say(f"       {line}")
        say(f"  por quê: {step.explain}")

        checks_before = len(self.checks)
        self.check(f"webhook respondeu HTTP {step.expect_http}", response.status_code == step.expect_http)
        for path, wanted in step.expect_body.items():
            got = dig(answer, path)
            self.check(f"resposta do webhook: {path} = {wanted}" + ("" if got == wanted else f" (veio {got!r})"),
                       got == wanted)
        if step.expect_reply is None:
            self.check("nada foi enviado ao cliente", not delivered)
        else:
            chat, text = step.expect_reply
            got = [(m["chatId"], m["text"]) for m in delivered]
            self.check(f"uma resposta enviada para {chat}", got == [(chat, text)])
        self.check(f"LLM consultado {step.llm_calls} vez(es)", len(new_llm) == step.llm_calls)
        self.check(f"log: {step.expect_log}", any(re.search(step.expect_log, line) for line in lines))
        self.report_checks(checks_before)
        say()
        return answer

    def wait_for_log(self, event_id: str, pattern: str, timeout: float = 5.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            lines = [tidy(line) for line in self.gunicorn.log_text().splitlines()
                     if f"event={event_id} " in line and any(mark in line for mark in DECISION_MARKS)]
            if any(re.search(pattern, line) for line in lines) or time.monotonic() > deadline:
                return lines
            time.sleep(0.05)


def tidy(line: str) -> str:
    """Log line without the date and logger name: '12:00:01,234 INFO [pid 7] event=... decision=...'."""
    return re.sub(r"^\d{4}-\d\d-\d\d (\S+) (\w+) (\[pid \d+\]) whatsapp_webhook: ", r"\1 \2 \3 ", line)


def dig(document: Any, path: str) -> Any:
    for part in path.split("."):
        document = document.get(part) if isinstance(document, dict) else None
    return document


def describe_answer(answer: dict[str, Any]) -> str:
    if answer.get("status") == "processed":
        result = answer.get("result") or {}
        return f"status=processed result.status={result.get('status')} message_id={result.get('message_id')}"
    if answer.get("status") == "ignored":
        return f"status=ignored reason={answer.get('reason')} ({answer.get('detail')})"
    if "error" in answer:
        return f"error={answer['error']}"
    return short(str(answer))


def bare_id(serialized: str | None) -> str | None:
    try:
        return wp.parse_message_id(serialized)[2] if serialized else None
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------------
# The scenario
# --------------------------------------------------------------------------------------------------
def serve_media(demo: Demo, envelope: dict[str, Any], name: str, mimetype: str) -> None:
    """The fake WAHA holds the committed file at the message's media.url, as WAHA does for 180 s."""
    data = (MEDIA_DIR / name).read_bytes()
    demo.waha.serve_file(urlsplit(envelope["payload"]["media"]["url"]).path, data, mimetype)
    say(f"     (WAHA guarda {name}, {len(data)} bytes, em {envelope['payload']['media']['url']})")


def scenario(demo: Demo) -> None:
    total = 8
    question = "Olá, qual o horário de funcionamento?"
    first = wp.text_message(ENGINE, body=question, sender=wp.CUSTOMER_PN)
    answer = demo.run(1, total, Step(
        "Cliente manda uma pergunta (número de telefone, @c.us)", first,
        f"{wp.CUSTOMER_NAME} ({wp.CUSTOMER_PN}) escreve: \"{question}\"",
        200, {"status": "processed", "result.status": "success"}, r"decision=replied outcome=success",
        "mensagem nova de um cliente: o LLM responde e o servidor envia a resposta pelo sendText do WAHA, "
        "com 'visto' e 'digitando...' antes (TYPING_SIMULATION=true)",
        expect_reply=(wp.CUSTOMER_PN, fake_llm_reply(question)), llm_calls=1))

    same_id = bare_id(first["payload"]["id"])
    duplicate = wp.text_message(ENGINE, body=question, sender=wp.CUSTOMER_PN, message_id=same_id, event="message.any")
    demo.run(2, total, Step(
        "O WAHA entrega a mesma mensagem de novo, como 'message.any'", duplicate,
        f"(nada de novo: é a mensagem 1, id {same_id}, num segundo evento)",
        200, {"status": "ignored", "reason": "duplicate"}, r"decision=ignored reason=duplicate",
        "o webhook assina 'message' e 'message.any'; o id da mensagem já está no STATE_DB, então o cliente "
        "não recebe a resposta duas vezes"))

    sent_id = dig(answer, "result.message_id")
    ack = wp.message_ack(ENGINE, chat=wp.CUSTOMER_PN, message_id=bare_id(sent_id), ack=3)
    demo.run(3, total, Step(
        "O cliente lê a resposta (message.ack)", ack,
        f"{wp.CUSTOMER_NAME} abriu a resposta do bot (ack=3 READ de {sent_id})",
        200, {"status": "ignored", "reason": "event_not_handled"}, r"decision=ignored reason=event_not_handled",
        "confirmações de entrega/leitura não são mensagens novas"))

    delivery = "Vocês fazem entrega em Campinas?"
    demo.run(4, total, Step(
        "Cliente identificado só pelo @lid (número escondido)",
        wp.text_message(ENGINE, body=delivery, sender=wp.CUSTOMER_LID, sender_alt=None),
        f"{wp.CUSTOMER_NAME} ({wp.CUSTOMER_LID}) escreve: \"{delivery}\"",
        200, {"status": "processed", "result.status": "success", "result.from_number": wp.CUSTOMER_LID},
        r"decision=replied outcome=success",
        "o WhatsApp pode esconder o número e mandar um id @lid; a resposta vai para o mesmo @lid",
        expect_reply=(wp.CUSTOMER_LID, fake_llm_reply(delivery)), llm_calls=1))

    group_text = "Alguém sabe se a loja abre amanhã?"
    demo.run(5, total, Step(
        "Mensagem num grupo",
        wp.text_message(ENGINE, body=group_text, sender=wp.OTHER_PN, group=wp.GROUP_ID),
        f"Outra Pessoa ({wp.OTHER_PN}) escreve no grupo {wp.GROUP_ID}: \"{group_text}\"",
        200, {"status": "ignored", "reason": "group_chat"}, r"decision=ignored reason=group_chat",
        "REPLY_IN_GROUPS=false (o padrão): o bot não fala em grupos"))

    voice_note = wp.media_message(ENGINE, kind="audio", sender=wp.CUSTOMER_PN)
    demo.run(6, total, Step(
        "Áudio (voice note) perguntando o horário",
        voice_note,
        f"{wp.CUSTOMER_NAME} ({wp.CUSTOMER_PN}) grava um áudio de 2 s: \"qual o horário de vocês?\" "
        "(fakes/data/media/voice_note.ogg, feito com espeak-ng + opusenc)",
        200, {"status": "processed", "result.status": "success"}, r"decision=replied outcome=success",
        "o servidor baixa o áudio do WAHA (GET /api/files/..., com X-Api-Key) logo que a mensagem chega e o manda "
        "ao LLM na mesma chamada (input_audio, format ogg); a transcrição que o modelo devolve num bloco "
        "[[nota]] fica no histórico e é retirada da resposta",
        expect_reply=(wp.CUSTOMER_PN, fake_llm_reply("qual o horário de vocês?")), llm_calls=1,
        before=lambda: serve_media(demo, voice_note, "voice_note.ogg", "audio/ogg")))

    photo = wp.media_message(ENGINE, kind="image", caption="quanto custa?", sender=wp.CUSTOMER_PN)
    demo.run(7, total, Step(
        "Foto de um produto com a legenda \"quanto custa?\"",
        photo,
        f"{wp.CUSTOMER_NAME} ({wp.CUSTOMER_PN}) manda uma foto (fakes/data/media/product.jpg) com \"quanto custa?\"",
        200, {"status": "processed", "result.status": "success"}, r"decision=replied outcome=success",
        "a imagem vai como image_url (data:image/jpeg;base64,...) seguida da legenda, numa chamada só",
        expect_reply=(wp.CUSTOMER_PN, fake_llm_reply("quanto custa?")), llm_calls=1,
        before=lambda: serve_media(demo, photo, "product.jpg", "image/jpeg")))

    price = "Qual o valor do frete para o Rio?"
    demo.run(8, total, Step(
        "O LLM está fora do ar (falha programada no LLM falso: HTTP 503 em toda tentativa)",
        wp.text_message(ENGINE, body=price, sender=wp.OTHER_PN),
        f"Outra Pessoa ({wp.OTHER_PN}) escreve: \"{price}\"",
        200, {"status": "processed", "result.status": "fallback"}, r"decision=replied outcome=fallback",
        f"o servidor tenta o LLM {LLM_ATTEMPTS} vezes (LLM_MAX_ATTEMPTS) e, sem resposta, manda "
        "FALLBACK_MESSAGE para o cliente não ficar sem retorno",
        expect_reply=(wp.OTHER_PN, DEFAULT_FALLBACK_MESSAGE), llm_calls=LLM_ATTEMPTS,
        before=lambda: demo.llm.add_fault("/chat/completions", status=503, times=None),
        after=demo.llm.clear_faults))

    stats = demo.client.get(demo.gunicorn.url + "/stats").json()["stats"]
    say("=== /stats no fim ===")
    for name in ("messages_received", "messages_processed", "messages_failed", "messages_in_progress",
                 "messages_ignored", "ignored_by_reason", "requests_rejected", "requests_unauthorized"):
        say(f"  {name}: {stats.get(name)}")
    say("  (messages_failed conta respostas de fallback: o cliente recebeu um aviso, não uma resposta do LLM)")
    wanted = {"messages_received": 5, "messages_processed": 4, "messages_failed": 1, "messages_in_progress": 0,
              "ignored_by_reason": {"duplicate": 1, "event_not_handled": 1, "group_chat": 1},
              "requests_rejected": 0, "requests_unauthorized": 0}
    checks_before = len(demo.checks)
    for name, value in wanted.items():
        demo.check(f"/stats {name} = {value}" + ("" if stats.get(name) == value else f" (veio {stats.get(name)!r})"),
                   stats.get(name) == value)
    demo.report_checks(checks_before)


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------
class Terminated(Exception):
    """SIGTERM: unwind through the cleanup like Ctrl-C does."""


def _terminate(signum: int, _frame: Any) -> None:
    raise Terminated(signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Demonstração sem contas: WAHA falso + LLM falso + servidor real")
    parser.add_argument("--keep", action="store_true", help="não apaga a pasta temporária (log, estado) no fim")
    args = parser.parse_args(argv)
    try:
        sys.stdout.reconfigure(errors="replace")  # type: ignore[attr-defined]
    except (AttributeError, ValueError):
        pass
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, _terminate)

    started = time.monotonic()
    folder = Path(tempfile.mkdtemp(prefix="whatsapp-demo-"))
    waha = FakeWaha(api_key=WAHA_KEY, engine=ENGINE)
    llm = FakeOpenRouter(api_key=LLM_KEY, reply=fake_llm_reply)
    gunicorn: GunicornServer | None = None
    client = httpx.Client(timeout=30)
    code = 1
    try:
        waha.start()
        llm.start()
        gunicorn = GunicornServer(folder, server_env(waha, llm), workers=2, stop_timeout=30)
        say("Demonstração sem contas: nada sai desta máquina (tudo em 127.0.0.1)")
        say(f"  WAHA falso:   {waha.url}  (motor {ENGINE}, sessão '{wp.SESSION}', chave {WAHA_KEY})")
        say(f"  LLM falso:    {llm.url}/api/v1  (respostas prontas por palavra-chave; não é um modelo de verdade)")
        say("  subindo o servidor real com gunicorn (2 workers)...")
        gunicorn.start()
        say(f"  servidor:     {gunicorn.url}{WEBHOOK_PATH}  (assinatura HMAC exigida, chave {HMAC_KEY})")
        say(f"  pasta temporária: {folder}  (STATE_DB, LOG_FILE; .env.webhook não é lido)")
        say()
        demo = Demo(waha, llm, gunicorn, client)
        scenario(demo)
        failed = [label for label, ok in demo.checks if not ok]
        say()
        if failed:
            say(f"RESULTADO: {len(failed)} de {len(demo.checks)} verificações FALHARAM:")
            for label in failed:
                say(f"  - {label}")
            say("saída do gunicorn (fim):\n" + gunicorn.tail())
        else:
            say(f"RESULTADO: tudo como esperado ({len(demo.checks)} verificações) em "
                f"{time.monotonic() - started:.1f} s.")
            say("Para usar de verdade: preencha .env.webhook e rode ./start_webhook_server.sh "
                "(veja README_WEBHOOK.md).")
        code = 1 if failed else 0
    except KeyboardInterrupt:
        say("\ninterrompido (Ctrl-C): encerrando...")
        code = 130
    except Terminated:
        say("\ninterrompido (SIGTERM): encerrando...")
        code = 128 + signal.SIGTERM
    except (GunicornError, httpx.HTTPError, OSError) as exc:
        say(f"\nERRO: a demonstração não pôde rodar: {exc}")
        if gunicorn is not None and not isinstance(exc, GunicornError):  # its message ends with the output
            say("saída do gunicorn (fim):\n" + gunicorn.tail())
        code = 2
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip the cleanup
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            if gunicorn is not None:
                gunicorn.stop()
            client.close()
            llm.stop()
            waha.stop()
        finally:
            if args.keep:
                say(f"pasta mantida: {folder}  (webhook.log, gunicorn.out, state.db)")
            else:
                shutil.rmtree(folder, ignore_errors=True)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return code


if __name__ == "__main__":
    sys.exit(main())
