"""The command line: the development server, --check-settings, --check (talk to WAHA and the LLM once),
--migrate-to-postgres (state_migration) and a customer's data on request (--export-chat, --forget-chat)."""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from collections.abc import (
    Mapping,
)
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from whatsapp_webhook import __version__
from whatsapp_webhook.app import (
    check_local_resources,
    create_app,
    recover_after_restart,
    start_worker,
)
from whatsapp_webhook.business import GLOBAL, BusinessProfiles, describe_profile
from whatsapp_webhook.logs import log
from whatsapp_webhook.media import media_summary
from whatsapp_webhook.ownership import StateFileBusy, StateFileOwner, port_in_use_message
from whatsapp_webhook.settings import SettingsError, load_settings, redact_url, unknown_setting_warnings
from whatsapp_webhook.state_migration import MigrationRefused, migrate_to_postgres
from whatsapp_webhook.store_api import StoreUnavailable
from whatsapp_webhook.stores import open_store
from whatsapp_webhook.upstream import error_message

if TYPE_CHECKING:
    from whatsapp_webhook.settings import Settings


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    hint: str = ""

    def line(self) -> str:
        text = f"{'OK  ' if self.ok else 'FAIL'} {self.name}: {self.detail}"
        return text if self.ok or not self.hint else f"{text}\n     fix: {self.hint}"


def check_deployment(settings: Settings, *, transport: httpx.BaseTransport | None = None) -> list[CheckResult]:
    """Talk to WAHA and the LLM once, the way the server will, and say what is wrong and how to fix it."""
    results: list[CheckResult] = []
    # SESSIONS_FILE's numbers: each must be a WORKING session of this WAHA, and its own models served.
    numbers = [p for name, p in BusinessProfiles(settings).all_profiles().items() if name != GLOBAL and p.enabled]
    with httpx.Client(transport=transport, timeout=10.0) as http:

        def get(url: str, **headers: str) -> httpx.Response | str:
            try:
                return http.get(url, headers=headers)
            except httpx.HTTPError as exc:
                return f"cannot reach {url} ({type(exc).__name__})"

        ping = get(f"{settings.waha_base_url}/ping")
        if isinstance(ping, str) or ping.status_code != 200:
            results.append(
                CheckResult(
                    "WAHA reachable",
                    False,
                    ping if isinstance(ping, str) else f"GET /ping answered HTTP {ping.status_code}",
                    "start WAHA or point WAHA_BASE_URL at it (default port 3000)",
                )
            )
        else:
            results.append(CheckResult("WAHA reachable", True, f"{settings.waha_base_url}/ping answered pong"))
            sessions = get(f"{settings.waha_base_url}/api/sessions?all=true", **{"X-Api-Key": settings.waha_api_key})
            if isinstance(sessions, str) or sessions.status_code != 200:
                status = sessions if isinstance(sessions, str) else f"HTTP {sessions.status_code}"
                results.append(
                    CheckResult(
                        "WAHA API key and sessions",
                        False,
                        f"GET /api/sessions: {status}",
                        "WAHA_API_KEY must equal the WAHA_API_KEY WAHA was started with"
                        if not isinstance(sessions, str) and sessions.status_code == 401
                        else "",
                    )
                )
            else:
                session_states = [
                    (str(x.get("name")), str(x.get("status"))) for x in sessions.json() if isinstance(x, dict)
                ]
                working = [name for name, status in session_states if status == "WORKING"]
                detail = ", ".join(f"{name}={status}" for name, status in session_states) or "no sessions"
                results.append(
                    CheckResult(
                        "WAHA session WORKING",
                        bool(working),
                        detail,
                        "start a session and pair it: WAHA dashboard (/dashboard) or "
                        "GET /api/{session}/auth/qr, then scan the QR code with WhatsApp",
                    )
                )
                states = dict(session_states)
                for number in numbers:
                    state = states.get(number.name, "not on this WAHA")
                    results.append(
                        CheckResult(
                            f"WAHA session {number.name} (SESSIONS_FILE)",
                            state == "WORKING",
                            f"{number.name}={state}",
                            f"create and pair the session {number.name} in WAHA, or set enabled = false in its table",
                        )
                    )

        auth = {"Authorization": f"Bearer {settings.openrouter_api_key}"} if settings.openrouter_api_key else {}
        base = settings.openrouter_base_url
        if settings.uses_openrouter:  # its /models is public: only /key says whether the key works
            key = get(f"{base}/key", **auth)
            if isinstance(key, str):
                results.append(CheckResult("OpenRouter key", False, key, "check the network path to openrouter.ai"))
            elif key.status_code in (401, 403):
                results.append(
                    CheckResult(
                        "OpenRouter key",
                        False,
                        f"the key was rejected (GET /key answered HTTP {key.status_code})",
                        "create a key at https://openrouter.ai/keys and set OPENROUTER_API_KEY",
                    )
                )
            elif key.status_code != 200:
                results.append(CheckResult("OpenRouter key", False, f"GET /key answered HTTP {key.status_code}"))
            else:
                data = _json_or_none(key)
                data = data.get("data", {}) if isinstance(data, dict) else {}
                results.append(
                    CheckResult(
                        "OpenRouter key",
                        True,
                        f"valid (limit_remaining={data.get('limit_remaining')}, free tier={data.get('is_free_tier')})",
                    )
                )
        models = get(f"{base}/models", **auth)
        if isinstance(models, str):
            results.append(
                CheckResult(
                    "LLM reachable",
                    False,
                    models,
                    "check OPENROUTER_BASE_URL (an OpenAI-compatible base URL ending in /v1)",
                )
            )
        elif models.status_code in (401, 403):
            results.append(
                CheckResult(
                    "LLM key",
                    False,
                    f"{base}/models rejected the key (HTTP {models.status_code})",
                    "set OPENROUTER_API_KEY to a key this server accepts",
                )
            )
        elif models.status_code != 200 or (listed := listed_models(models)) is None:
            results.append(
                CheckResult(
                    "LLM reachable",
                    False,
                    f"GET {base}/models answered HTTP {models.status_code}"
                    f"{'' if models.status_code != 200 else ' without a model list'}",
                    "check OPENROUTER_BASE_URL (an OpenAI-compatible base URL ending in /v1)",
                )
            )
        else:
            settings_of = [
                ("OPENROUTER_MODEL", settings.openrouter_model),
                *(("OPENROUTER_FALLBACK_MODELS", m) for m in settings.openrouter_fallback_models),
            ]
            for number in numbers:
                own = number.settings
                if own.llm_models != settings.llm_models:
                    settings_of.append((f"[{number.name}] openrouter_model", own.openrouter_model))
                    settings_of += [
                        (f"[{number.name}] openrouter_fallback_models", m) for m in own.openrouter_fallback_models
                    ]
            for setting, model in settings_of:
                name = f"LLM model {setting}"
                if model in listed:
                    kinds = listed[model]
                    results.append(
                        CheckResult(
                            name, True, f"{model} is served" + (f" (input: {', '.join(kinds)})" if kinds else "")
                        )
                    )
                    if setting == "OPENROUTER_MODEL" and settings.media_enabled:
                        results.append(CheckResult("media", True, media_summary(kinds or None, model=model)))
                    continue
                suggestions = suggest_models(model, list(listed))
                results.append(
                    CheckResult(
                        name,
                        False,
                        f"{model} is not among the {len(listed)} models {base}/models lists",
                        f"set {setting} to a listed id" + (f", e.g. {' or '.join(suggestions)}" if suggestions else ""),
                    )
                )
            if not settings.uses_openrouter and settings.openrouter_model in listed:
                results.append(_check_test_completion(http, settings, auth))
    return results


def _check_test_completion(http: httpx.Client, settings: Settings, auth: Mapping[str, str]) -> CheckResult:
    """A one-token request: on servers other than OpenRouter only this shows whether the key is accepted
    (their /models is often open to anyone)."""
    url = f"{settings.openrouter_base_url}/chat/completions"
    body = {"model": settings.openrouter_model, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}
    try:
        response = http.post(url, json=body, headers=auth, timeout=settings.llm_attempt_timeout_seconds)
    except httpx.HTTPError as exc:
        return CheckResult("LLM answers", False, f"cannot reach {url} ({type(exc).__name__})")
    if response.status_code in (401, 403):
        return CheckResult(
            "LLM key",
            False,
            f"{url} rejected the key (HTTP {response.status_code})",
            "set OPENROUTER_API_KEY to a key this server accepts",
        )
    if response.status_code != 200:
        return CheckResult(
            "LLM answers",
            False,
            f"a one-token test request answered HTTP {response.status_code}: {error_message(response)}",
        )
    return CheckResult("LLM answers", True, f"{settings.openrouter_model} answered a one-token test request")


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def listed_models(response: httpx.Response) -> dict[str, tuple[str, ...]] | None:
    """GET /models as {id: input modalities}; None when the answer is not an OpenAI-style model list."""
    document = _json_or_none(response)
    data = document.get("data") if isinstance(document, dict) else None
    if not isinstance(data, list):
        return None
    listed: dict[str, tuple[str, ...]] = {}
    for entry in data:
        if isinstance(entry, dict) and isinstance(entry.get("id"), str):
            raw_architecture = entry.get("architecture")
            architecture: Mapping[str, Any] = raw_architecture if isinstance(raw_architecture, dict) else {}
            kinds = architecture.get("input_modalities")
            listed[entry["id"]] = tuple(k for k in kinds if isinstance(k, str)) if isinstance(kinds, list) else ()
    return listed


def suggest_models(missing: str, listed: list[str], *, count: int = 3) -> list[str]:
    """Ids from the server's own list that look like the missing one (never a hard-coded id: those retire)."""
    close = difflib.get_close_matches(missing, listed, n=count, cutoff=0.6)
    if close:
        return close
    vendor = missing.split("/")[0] + "/" if "/" in missing else ""
    same_vendor = sorted(m for m in listed if vendor and m.startswith(vendor))
    return difflib.get_close_matches(missing, same_vendor, n=count, cutoff=0.0) if same_vendor else []


def migrate_command(settings: Settings, url: str) -> int:
    """--migrate-to-postgres: 0 once moved, 2 when refused (nothing changed); what happened, one line each."""
    try:
        report = migrate_to_postgres(settings.state_db, url, timeout=max(30.0, settings.state_db_timeout_seconds))
    except (MigrationRefused, SettingsError) as exc:
        print(f"FAIL migrate: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the state file's folder: its claim file, a rename (the message names the path)
        print(f"FAIL migrate: STATE_DB {settings.state_db!r} cannot be moved ({exc})", file=sys.stderr)
        return 2
    for line in report.lines():
        print(line)
    print(f"next: set STATE_DB={redact_url(url)} (with its password) on every server, then start them")
    return 0


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="whatsapp_webhook_server.py",
        allow_abbrev=False,
        description="WhatsApp AI reply server. Without options: Flask's development server on WEBHOOK_HOST:"
        "WEBHOOK_PORT (production runs gunicorn: ./start_webhook_server.sh). Settings come from the "
        "environment and .env.webhook (see .env.webhook.example).",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--check-settings",
        action="store_true",
        help="validate the settings, STATE_DB and LOG_FILE, then exit (0 = fine, 2 = what to fix)",
    )
    mode.add_argument(
        "--check",
        action="store_true",
        help="also talk to WAHA and the LLM once: sessions, key, models (exit 1 if anything fails)",
    )
    mode.add_argument(
        "--export-chat",
        metavar="CHAT_ID",
        help="print as JSON everything stored about this chat (LGPD), e.g. 5511988887777@c.us, then exit",
    )
    mode.add_argument(
        "--forget-chat",
        metavar="CHAT_ID",
        help="delete everything stored about this chat, media included, say what was deleted, then exit",
    )
    parser.add_argument(
        "--session", default="default", help="with --export-chat/--forget-chat: the WAHA session (default: default)"
    )
    mode.add_argument(
        "--migrate-to-postgres",
        metavar="POSTGRESQL_URL",
        help="move the SQLite state file (STATE_DB) into that PostgreSQL database, then exit; "
        "stop the server first (docs/varios-hosts.md)",
    )
    mode.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser.parse_args(argv)


def chat_data_command(settings: Settings, *, export: str | None, forget: str | None, session: str) -> int:
    """--export-chat / --forget-chat: through the Store interface, so both backends answer alike."""
    chat_id = (export or forget or "").strip()
    if "@" not in chat_id:
        chat_id += "@c.us"  # a bare phone number, as people type it
    chat_key = f"{session}:{chat_id}"
    store = open_store(settings, one_off=True)
    try:
        store.initialize()
        if export:
            print(store.export_chat(chat_key).to_json())
            return 0
        report = store.forget_chat(chat_key)
    except StoreUnavailable as exc:
        print(f"whatsapp_webhook_server: the state store cannot be used: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()
    if not any(report.deleted.values()) and not report.kept_keys:
        print(f"nothing stored about {chat_id} in session {session}")
        return 0
    print(f"forgot {chat_id} in session {session}:")
    for line in report.lines():
        print(f"  {line}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run Flask's development server (production uses gunicorn; see start_webhook_server.sh).

    --check-settings validates the configuration; --check also talks to WAHA and the LLM.
    An unknown option is an error (argparse exits 2) rather than a server started by accident.
    """
    args = parse_arguments(sys.argv[1:] if argv is None else argv)
    owner: StateFileOwner | None = None
    try:
        settings = load_settings()
        if args.migrate_to_postgres:  # before the start-up check, which would create a missing state file
            return migrate_command(settings, args.migrate_to_postgres)
        check_local_resources(settings)
        warnings = unknown_setting_warnings(os.environ)
        if args.export_chat or args.forget_chat:
            return chat_data_command(settings, export=args.export_chat, forget=args.forget_chat, session=args.session)
        if args.check_settings or args.check:
            fallbacks = ", ".join(settings.openrouter_fallback_models) or "none"
            print(
                f"OK   settings: WAHA {settings.waha_base_url}, LLM {settings.openrouter_base_url} "
                f"model {settings.openrouter_model} (fallbacks: {fallbacks}), state {redact_url(settings.state_db)}"
            )
            for warning in warnings:
                print(f"WARN {warning}")
            if settings.sessions_file or settings.business_hours or settings.ai_knowledge_file:
                for profile in BusinessProfiles(settings).all_profiles().values():
                    print(f"OK   {describe_profile(profile)}")
        if args.check_settings:
            return 0
        if args.check:
            results = check_deployment(settings)
            for result in results:
                print(result.line())
            return 0 if all(result.ok for result in results) else 1
        for warning in warnings:
            log.warning(warning)
        # Like gunicorn.conf.py: the port first, then the state file, and only then recovery.
        if message := port_in_use_message(settings.host, settings.port):
            print(f"whatsapp_webhook_server: {message}", file=sys.stderr)
            return 2
        owner = StateFileOwner(settings.state_db)
        owner.acquire()
        recover_after_restart(settings)
        application = create_app(settings)
    except (SettingsError, StateFileBusy) as exc:
        print(f"FAIL settings: {exc}" if args.check else f"whatsapp_webhook_server: {exc}", file=sys.stderr)
        return 2
    log.info("starting development server on %s:%d (use gunicorn in production)", settings.host, settings.port)
    start_worker(application)
    # The Werkzeug debugger executes code typed into the browser: never offer it beyond this machine.
    loopback = settings.host in ("127.0.0.1", "localhost", "::1")
    try:
        application.run(
            host=settings.host,
            port=settings.port,
            debug=settings.debug,
            use_debugger=settings.debug and loopback,
            threaded=True,
            use_reloader=False,
        )
    finally:
        owner.release()
    return 0
