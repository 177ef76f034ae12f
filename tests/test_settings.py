"""Settings: defaults, validation messages that say how to fix things, and .env.webhook loading."""

import os
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from whatsapp_webhook.app import create_app
from whatsapp_webhook.settings import (
    DEFAULT_FALLBACK_MESSAGE,
    Setting,
    Settings,
    SettingsError,
    declared_settings,
    is_postgres_url,
    load_settings,
    redact_url,
    setting_names,
    unknown_setting_warnings,
)

REQUIRED = {"OPENROUTER_API_KEY": "sk-or-v1-test", "WAHA_API_KEY": "waha-test"}


def server_root() -> Path:
    return Path(__file__).resolve().parents[1]


def test_defaults_match_the_documented_values() -> None:
    settings = Settings.from_env(REQUIRED)
    assert (settings.host, settings.port) == ("0.0.0.0", 5002)
    assert settings.openrouter_base_url == "https://openrouter.ai/api/v1"
    assert settings.openrouter_model == "google/gemini-3.1-flash-lite"
    assert settings.openrouter_fallback_models == ("google/gemini-3.5-flash",)
    assert settings.llm_models == ("google/gemini-3.1-flash-lite", "google/gemini-3.5-flash")
    assert settings.llm_reasoning_effort == "minimal"
    assert settings.log_file == "/tmp/whatsapp_webhook.log"
    assert settings.reply_in_groups is False and settings.typing_simulation is True
    assert settings.webhook_sync_wait_seconds == 20.0
    assert settings.webhook_secret_token is None and settings.webhook_hmac_key is None
    assert settings.request_read_timeout_seconds == 10.0


def test_every_documented_variable_is_read() -> None:
    env = dict(REQUIRED, WEBHOOK_HOST="127.0.0.1", WEBHOOK_PORT="8080", DEBUG="true",
               OPENROUTER_BASE_URL="http://localhost:11434/v1/", OPENROUTER_MODEL="llama3",
               AI_SYSTEM_PROMPT="Be brief.", WAHA_BASE_URL="http://waha:3000", WEBHOOK_SECRET_TOKEN="tok",
               WEBHOOK_HMAC_KEY="hk", STATE_DB="/tmp/x.db", LOG_FILE="", LOG_LEVEL="debug",
               REPLY_IN_GROUPS="yes", FALLBACK_MESSAGE="Sorry!", TYPING_SIMULATION="off",
               WEBHOOK_SYNC_WAIT_SECONDS="2.5", REQUEST_READ_TIMEOUT_SECONDS="4.5")
    s = Settings.from_env(env)
    assert (s.host, s.port, s.debug) == ("127.0.0.1", 8080, True)
    assert s.openrouter_base_url == "http://localhost:11434/v1"  # trailing slash dropped
    assert (s.openrouter_model, s.ai_system_prompt, s.waha_base_url) == ("llama3", "Be brief.", "http://waha:3000")
    assert (s.webhook_secret_token, s.webhook_hmac_key, s.state_db) == ("tok", "hk", "/tmp/x.db")
    assert s.log_file is None and s.log_level == "DEBUG"
    assert s.reply_in_groups is True and s.typing_simulation is False
    assert (s.fallback_message, s.webhook_sync_wait_seconds) == ("Sorry!", 2.5)
    assert s.request_read_timeout_seconds == 4.5


@pytest.mark.parametrize("raw, models", [
    ("", ("google/gemini-3.5-flash",)),  # blank is the default, as for every setting (compose passes blanks)
    ("none", ()),
    ("None", ()),
    ("a/one", ("a/one",)),
    (" a/one , b/two,,a/one ", ("a/one", "b/two")),
])
def test_fallback_models_are_a_comma_separated_list(raw: str, models: tuple[str, ...]) -> None:
    settings = Settings.from_env(dict(REQUIRED, OPENROUTER_FALLBACK_MODELS=raw))
    assert settings.openrouter_fallback_models == models


def test_fallback_models_and_reasoning_effort_are_validated() -> None:
    with pytest.raises(SettingsError) as error:
        Settings.from_env(dict(REQUIRED, OPENROUTER_FALLBACK_MODELS="a/one b/two", LLM_REASONING_EFFORT="max"))
    assert "OPENROUTER_FALLBACK_MODELS must be model ids separated by commas (or none)" in str(error.value)
    assert "LLM_REASONING_EFFORT must be one of NONE, MINIMAL, LOW, MEDIUM, HIGH" in str(error.value)


def test_reply_max_sends_below_the_servers_own_attempts_is_refused_with_why() -> None:
    with pytest.raises(SettingsError, match=r"REPLY_MAX_SENDS \(2\) must be at least REPLY_MAX_ATTEMPTS \(5\)"):
        Settings.from_env(dict(REQUIRED, REPLY_MAX_SENDS="2"))
    assert Settings.from_env(dict(REQUIRED, REPLY_MAX_SENDS="5")).reply_max_sends == 5
    # An install that only raised REPLY_MAX_ATTEMPTS keeps starting: unset, the bound follows it.
    assert Settings.from_env(dict(REQUIRED, REPLY_MAX_ATTEMPTS="30")).reply_max_sends == 60
    assert Settings.from_env(dict(REQUIRED)).reply_max_sends == 10


def test_missing_keys_are_all_named_with_where_to_set_them() -> None:
    with pytest.raises(SettingsError) as error:
        Settings.from_env({})
    message = str(error.value)
    assert "OPENROUTER_API_KEY is not set" in message and "WAHA_API_KEY is not set" in message
    assert ".env.webhook" in message


def test_placeholder_values_from_the_example_file_are_refused() -> None:
    with pytest.raises(SettingsError, match="OPENROUTER_API_KEY still holds the placeholder"):
        Settings.from_env(dict(REQUIRED, OPENROUTER_API_KEY="sk-or-v1-your-key-here"))


def test_a_local_openai_compatible_server_needs_no_openrouter_key() -> None:
    settings = Settings.from_env({"WAHA_API_KEY": "k", "OPENROUTER_BASE_URL": "http://localhost:8000/v1"})
    assert settings.openrouter_api_key == "" and not settings.uses_openrouter


@pytest.mark.parametrize("name, value, expected", [
    ("WEBHOOK_PORT", "abc", "WEBHOOK_PORT must be a whole number from 1 to 65535, got 'abc'"),
    ("WEBHOOK_PORT", "70000", "WEBHOOK_PORT must be a whole number"),
    ("DEBUG", "maybe", "DEBUG must be true or false, got 'maybe'"),
    ("WAHA_BASE_URL", "waha:3000", "WAHA_BASE_URL must be an http:// or https:// URL"),
    # Passes a scheme-and-host check, but no request could be built from it: told now, not at a worker's boot.
    ("WAHA_BASE_URL", "http://waha:abc", "WAHA_BASE_URL is not a usable URL (Invalid port: 'abc')"),
    ("OPENROUTER_BASE_URL", "http://☃.com/api/v1", "OPENROUTER_BASE_URL is not a usable URL (Invalid IDNA hostname"),
    ("WEBHOOK_SYNC_WAIT_SECONDS", "-1", "WEBHOOK_SYNC_WAIT_SECONDS must be a number from 0 to 600"),
    ("REQUEST_READ_TIMEOUT_SECONDS", "0", "REQUEST_READ_TIMEOUT_SECONDS must be a number from 1 to 300, got '0'"),
    ("REQUEST_READ_TIMEOUT_SECONDS", "ten", "REQUEST_READ_TIMEOUT_SECONDS must be a number from 1 to 300"),
    ("LOG_LEVEL", "LOUD", "LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR"),
    ("FALLBACK_MESSAGE", " ", None),  # blank means "use the default", not an empty reply
])
def test_invalid_values_are_explained(name: str, value: str, expected: str | None) -> None:
    env = dict(REQUIRED, **{name: value})
    if expected is None:
        assert Settings.from_env(env).fallback_message == DEFAULT_FALLBACK_MESSAGE
        return
    with pytest.raises(SettingsError) as error:
        Settings.from_env(env)
    assert expected in str(error.value)


def test_secrets_never_appear_in_the_settings_repr() -> None:
    settings = Settings.from_env(dict(REQUIRED, WEBHOOK_HMAC_KEY="hmac-secret", WEBHOOK_SECRET_TOKEN="tok-secret"))
    text = repr(settings)
    for secret in ("sk-or-v1-test", "waha-test", "hmac-secret", "tok-secret"):
        assert secret not in text


def test_env_file_fills_gaps_but_real_environment_wins(tmp_path, monkeypatch) -> None:
    env_file = tmp_path / ".env.webhook"
    env_file.write_text("OPENROUTER_API_KEY=from-file\nWAHA_API_KEY=waha-from-file\nWEBHOOK_PORT=6000\n")
    for name in ("OPENROUTER_API_KEY", "WAHA_API_KEY", "WEBHOOK_PORT", "OPENROUTER_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WEBHOOK_PORT", "7000")
    settings = load_settings(str(env_file))
    assert settings.openrouter_api_key == "from-file" and settings.waha_api_key == "waha-from-file"
    assert settings.port == 7000
    for name in ("OPENROUTER_API_KEY", "WAHA_API_KEY"):
        os.environ.pop(name, None)  # load_dotenv wrote them into the real environment


def test_unwritable_state_db_fails_at_start_with_a_fix(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    settings = Settings.from_env(dict(REQUIRED, STATE_DB=str(blocker / "state.db"), LOG_FILE=""))
    with pytest.raises(SettingsError, match="STATE_DB .* point STATE_DB at a writable file"):
        create_app(settings)


def test_variables_that_look_like_ours_are_named_with_the_closest_setting() -> None:
    warnings = unknown_setting_warnings({
        "REPLY_IN_GROUP": "true", "TYPING_SIMULATON": "off", "OPENROUTER_MODELS": "x",  # typos
        "PATH": "/bin", "HOME": "/root", "WAHA_DASHBOARD_PASSWORD": "p", "LANG": "C.UTF-8",  # not ours
        "REPLY_IN_GROUPS": "true", "GUNICORN_WORKERS": "2", "WEBHOOK_ENV_FILE": "x",  # ours
    })
    assert warnings == [
        "OPENROUTER_MODELS is not a setting of this server (ignored); did you mean OPENROUTER_MODEL?",
        "REPLY_IN_GROUP is not a setting of this server (ignored); did you mean REPLY_IN_GROUPS?",
        "TYPING_SIMULATON is not a setting of this server (ignored); did you mean TYPING_SIMULATION?",
    ]


def test_every_documented_setting_is_known() -> None:
    example = (server_root() / ".env.webhook.example").read_text()
    names = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", example, flags=re.MULTILINE))
    assert names and names <= setting_names()


@pytest.mark.parametrize("value, words", [
    ("mysql://bot:secret@db/bot", "a mysql: URL is not supported"),
    ("sqlite:///tmp/x.db", "a sqlite: URL is not supported"),
    ("postgres:bot:secret@db", "a postgres: URL is not supported"),  # no //: not a URL libpq reads
])
def test_a_state_db_url_is_refused_instead_of_becoming_a_folder(value: str, words: str) -> None:
    with pytest.raises(SettingsError, match="STATE_DB must be a file path .* or a postgresql:// URL") as error:
        Settings.from_env(dict(REQUIRED, STATE_DB=value))
    assert words in str(error.value) and "secret" not in str(error.value)


@pytest.mark.parametrize("value", [
    "postgresql://bot:s3cret@db:5432/bot?sslmode=require&application_name=x",
    "postgres://bot:s3cret@db/bot",
    "POSTGRESQL://bot:s3cret@10.0.0.5/bot?password=s3cret",
])
def test_a_postgresql_url_selects_postgresql_and_its_password_is_never_shown(value: str) -> None:
    settings = Settings.from_env(dict(REQUIRED, STATE_DB=value))
    scheme = value.split(":", 1)[0].lower()
    assert settings.state_db == scheme + value[len(scheme):] and is_postgres_url(settings.state_db)
    assert "s3cret" not in repr(settings) and "s3cret" not in redact_url(value)
    assert redact_url(value).startswith(scheme + "://bot:***@")


def test_a_postgresql_url_with_a_bad_port_is_explained() -> None:
    with pytest.raises(SettingsError, match="STATE_DB has a port that is not a number"):
        Settings.from_env(dict(REQUIRED, STATE_DB="postgresql://bot:pw@db:port/bot"))


def test_a_file_path_stays_sqlite() -> None:
    assert not is_postgres_url(Settings.from_env(REQUIRED).state_db)
    assert redact_url("/data/state.db") == "/data/state.db"


def test_a_state_db_folder_is_refused(tmp_path) -> None:
    with pytest.raises(SettingsError, match="STATE_DB is the folder"):
        Settings.from_env(dict(REQUIRED, STATE_DB=str(tmp_path)))


# Settings that are on purpose not in .env.webhook.example (none today); each needs a reason here.
DELIBERATELY_UNDOCUMENTED: dict[str, str] = {}


def test_every_field_is_declared_with_its_variable_and_help_and_documented() -> None:
    example = (server_root() / ".env.webhook.example").read_text()
    documented = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", example, flags=re.MULTILINE))
    declared = declared_settings()
    assert list(declared) == [f.name for f in fields(Settings)]
    assert all(setting.default == f.default for setting, f in zip(declared.values(), fields(Settings), strict=True))
    variables = [setting.env for setting in declared.values()]
    assert len(set(variables)) == len(variables), "two fields read the same variable"
    for name, setting in declared.items():
        assert re.fullmatch(r"[A-Z][A-Z0-9_]*", setting.env), name
        assert setting.help.strip(), f"{setting.env} has no help text"
        assert setting.env in documented or setting.env in DELIBERATELY_UNDOCUMENTED, \
            f"{setting.env} is missing from .env.webhook.example"
    assert set(variables) <= setting_names()


WRITTEN_IN_A_GRAMMAR = {
    "BUSINESS_HOURS": "seg-sex 09:00-17:00",
    "BUSINESS_TIMEZONE": "Europe/Lisbon",
    "BUSINESS_HOLIDAYS": "2026-12-25, 2027-01-01",
}


def a_valid_other_value(setting: Setting, tmp_path: Path) -> tuple[str, Any]:
    """What to put in the variable, and the value the loader must make of it, unlike the default."""
    default = setting.default
    if setting.env in WRITTEN_IN_A_GRAMMAR:  # text settings that are parsed: a value they accept
        value = WRITTEN_IN_A_GRAMMAR[setting.env]
        return value, value
    if setting.env == "SESSIONS_FILE":
        (tmp_path / "sessions.toml").write_text('[loja2]\nopenrouter_model = "a/b"\n', encoding="utf-8")
        return str(tmp_path / "sessions.toml"), str(tmp_path / "sessions.toml")
    if setting.env == "AI_KNOWLEDGE_FILE":
        (tmp_path / "faq.md").write_text("Entregamos em todo o bairro.", encoding="utf-8")
        return str(tmp_path / "faq.md"), str(tmp_path / "faq.md")
    if setting.kind in ("integer", "number"):
        assert setting.minimum is not None and setting.maximum is not None
        value = next(v for v in (setting.minimum, setting.maximum) if v != default)
        return (str(int(value)), int(value)) if setting.kind == "integer" else (repr(float(value)), float(value))
    if setting.kind == "boolean":
        return ("false", False) if default else ("yes", True)
    if setting.kind in ("text", "optional text"):
        return f"  {setting.env.lower()} value ", f"{setting.env.lower()} value"
    if setting.kind == "url":
        host = setting.env.lower().replace("_", "-")
        return f"http://{host}.test:8080/v1/", f"http://{host}.test:8080/v1"
    if setting.kind == "path":
        return str(tmp_path / "other.db"), str(tmp_path / "other.db")
    if setting.kind == "choice":
        read = [(choice, choice.lower() if setting.lower else choice) for choice in setting.choices]
        choice, value = next((c, v) for c, v in read if v != default)
        return choice.title(), value  # any case is read
    if setting.env == "MEDIA_ALLOWED_ORIGINS":  # a list of origins, checked as such
        return "https://a.test, http://b.test:9000,https://a.test", ("https://a.test", "http://b.test:9000")
    if setting.kind == "id list":
        return "a/one, b/two,a/one", ("a/one", "b/two")
    pytest.fail(f"{setting.env}: this test has no value for settings of kind {setting.kind!r}; add one")


def test_the_loader_reads_every_field_from_its_variable(tmp_path: Path) -> None:
    env, expected = {}, {}
    for name, setting in declared_settings().items():
        env[setting.env], expected[name] = a_valid_other_value(setting, tmp_path)
        assert expected[name] != setting.default, setting.env
    settings = Settings.from_env(env)
    assert {name: getattr(settings, name) for name in expected} == expected


def test_nothing_set_gives_the_declared_defaults() -> None:
    assert Settings.from_env(REQUIRED) == Settings(openrouter_api_key="sk-or-v1-test", waha_api_key="waha-test")
