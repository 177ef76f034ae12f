"""The documentation as a reader meets it: README_WEBHOOK.md is the front door, docs/ holds the reference.

A new user must find the commands on the README's first screen; every relative link in the README and in
docs/ must lead somewhere, down to the #anchor (GitHub's rules: lowercase, spaces become '-', punctuation
other than '-' and '_' removed, a repeated heading gets -1, -2...); every setting the server reads, and every
one .env.webhook.example shows, must be documented in a settings table; and numbers that change on their
own (test counts, line counts) must not be written into the text by hand.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.test_deploy_files import documented_names, names_the_server_reads
from whatsapp_webhook.settings import declared_settings

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README_WEBHOOK.md"
DOCS = ROOT / "docs"
ENV_EXAMPLE = ROOT / ".env.webhook.example"
FIRST_SCREEN_LINES = 25


def documents() -> list[Path]:
    found = [README, *sorted(DOCS.rglob("*.md"))]
    assert len(found) > 1, "docs/ holds the reference the README links to"
    return found


def without_inline_code(text: str) -> str:
    return re.sub(r"(`+)(?:(?!\1).)+?\1", "", text)


def prose(text: str) -> str:
    """The text a reader sees as prose: fenced code blocks and inline code removed (links in them are not links)."""
    return without_inline_code(re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.MULTILINE | re.DOTALL))


def headings(text: str) -> list[str]:
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.MULTILINE | re.DOTALL)
    return [match.group(1).strip() for match in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.MULTILINE)]


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: its rendered text, lowercased, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images keep their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = re.sub(r"(\*\*|__|\*|~~)(.+?)\1", r"\2", text)  # emphasis markers are not text
    return "".join(ch for ch in text.lower() if ch.isalnum() or ch in " -_").replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for heading in headings(path.read_text(encoding="utf-8")):
        slug = github_anchor(heading)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def broken_links(path: Path) -> list[str]:
    """Relative links of one Markdown file that lead nowhere: a missing file, or a missing #anchor in one."""
    problems = []
    for match in re.finditer(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", prose(path.read_text("utf-8"))):
        target = match.group(1)
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ... are not checked offline
            continue
        file_part, _, anchor = target.partition("#")
        destination = (path.parent / file_part).resolve() if file_part else path
        if not destination.exists():
            problems.append(f"{path.name}: {target} -> no such file")
        elif anchor and (destination.suffix != ".md" or anchor not in anchors(destination)):
            problems.append(f"{path.name}: {target} -> no heading #{anchor} in {destination.name}")
    return problems


def test_the_anchor_rules_are_githubs() -> None:
    assert github_anchor("1. O que é e como funciona") == "1-o-que-é-e-como-funciona"
    assert github_anchor("Conferir WAHA e LLM: `--check`") == "conferir-waha-e-llm---check"
    assert github_anchor("Arquivo de estado (`STATE_DB`)") == "arquivo-de-estado-state_db"
    assert github_anchor("Parear o WhatsApp (sessão `default` do WAHA)") == "parear-o-whatsapp-sessão-default-do-waha"
    assert github_anchor("**Negrito** e [um link](x.md)") == "negrito-e-um-link"
    assert github_anchor("`GET /health`, `GET /stats` e `GET /api/v1/whatsapp/webhook`") == \
        "get-health-get-stats-e-get-apiv1whatsappwebhook"


def test_the_link_check_finds_missing_files_and_anchors(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Outro\n## Seção\n## Seção\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text("# Página\n[a](other.md#seção-1) [b](#página) [c](https://example.com/x)\n"
                    "[d](missing.md) [e](other.md#nada) [f](#fim)\n`[g](not-a-link.md)`\n```\n[h](code.md)\n```\n",
                    encoding="utf-8")
    assert broken_links(page) == ["page.md: missing.md -> no such file",
                                  "page.md: other.md#nada -> no heading #nada in other.md",
                                  "page.md: #fim -> no heading #fim in page.md"]


@pytest.mark.parametrize("path", [*documents(), ROOT / "CHANGELOG.md"], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(path: Path) -> None:
    assert broken_links(path) == []


def test_the_readme_starts_with_what_this_is_and_the_commands() -> None:
    first_screen = "\n".join(README.read_text(encoding="utf-8").splitlines()[:FIRST_SCREEN_LINES])
    assert re.search(r"WAHA.*LLM", first_screen, flags=re.DOTALL)
    for command in ("./start_webhook_server.sh demo", "./start_webhook_server.sh test",
                    ".venv/bin/python whatsapp_webhook_server.py --check"):
        assert command in first_screen, f"{command!r} is not on the README's first screen"
    assert re.search(r"^\./start_webhook_server\.sh\s+#", first_screen, flags=re.MULTILINE), "the start command"


def test_the_readme_stays_a_front_door_and_links_every_doc() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) < 450, "the README is for installing and operating; reference goes to docs/"
    linked = {(README.parent / target).resolve()
              for target in re.findall(r"\]\((docs/[^)#\s]+)", prose(text))}
    orphans = [p.relative_to(ROOT).as_posix() for p in sorted(DOCS.rglob("*.md")) if p.resolve() not in linked]
    assert not orphans, f"docs the README never links to: {orphans}"


def settings_tables() -> set[str]:
    """Names that head a row of a settings table (| `NAME` | ...) in the README or docs/."""
    return {name for path in documents()
            for name in re.findall(r"^\|\s*`([A-Z][A-Z0-9_]*)`\s*\|", path.read_text("utf-8"), flags=re.MULTILINE)}


def test_every_setting_the_server_reads_and_the_example_shows_is_documented() -> None:
    # The Settings declaration and the variables gunicorn.conf.py, the start script and the process read.
    from_code = names_the_server_reads()
    example = documented_names(ENV_EXAMPLE)
    stray = sorted(example - from_code)
    assert not stray, f".env.webhook.example shows names the server never reads: {stray}"
    missing = from_code - settings_tables()
    assert not missing, f"settings with no row in a settings table of the README or docs/: {sorted(missing)}"


def plain(value: object) -> str:
    """A default or bound as the docs write it: 30 not 30.0, true not True, lists with commas."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return format(value, "f").rstrip("0").rstrip(".")
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)


def test_the_settings_tables_give_the_defaults_and_bounds_the_code_declares() -> None:
    rows = {}
    for path in documents():
        for name, default, meaning in re.findall(r"^\|\s*`([A-Z][A-Z0-9_]*)`\s*\|([^|]*)\|(.*)\|\s*$",
                                                 path.read_text(encoding="utf-8"), flags=re.MULTILINE):
            rows.setdefault(name, []).append((default, meaning))
    wrong = []
    for setting in declared_settings().values():
        described = rows.get(setting.env, [])
        if setting.minimum is not None:
            bounds = f"{plain(setting.minimum)}–{plain(setting.maximum)}".replace(str(2**40), "2^40")
            if not any(bounds in meaning for _, meaning in described):
                wrong.append(f"{setting.env}: bounds {bounds}")
        default = plain(setting.default)
        if setting.env == "STATE_DB":
            default = os.path.relpath(setting.default, ROOT)
        if setting.default is not None and len(default) < 60 and not any(default in d for d, _ in described):
            wrong.append(f"{setting.env}: default {default}")
    assert not wrong, f"settings tables that say otherwise than settings.py: {wrong}"


def test_numbers_that_change_on_their_own_are_not_written_by_hand() -> None:
    counted = re.compile(r"\b\d[\d.,]*\s+(?:passed|failed|skipped|testes|tests|verificações|linhas|lines)\b", re.I)
    # Pasted pytest output in a code block counts; a quoted log line (`llm attempt 1 failed`) does not.
    found = [f"{path.relative_to(ROOT).as_posix()}: {match.group()!r}"
             for path in documents() for match in counted.finditer(without_inline_code(path.read_text("utf-8")))]
    assert not found, f"counts that go stale the next time a test is added: {found}"


def test_the_project_map_names_every_test_file() -> None:
    project_map = (DOCS / "desenvolvimento.md").read_text(encoding="utf-8")
    unnamed = [path.relative_to(ROOT).as_posix() for path in sorted((ROOT / "tests").rglob("*.py"))
               if path.name != "__init__.py" and path.name not in project_map]
    assert not unnamed, f"docs/desenvolvimento.md does not say what these are: {unnamed}"


def test_the_docs_quote_the_events_docker_compose_subscribes() -> None:
    from tests.yaml_subset import read_simple_yaml

    compose = read_simple_yaml((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    subscribed = compose["services"]["waha"]["environment"]["WHATSAPP_HOOK_EVENTS"]
    quoted = [(path.name, events) for path in documents()
              for events in re.findall(r'`"?(message(?:,[a-z.]+)+)"?`|WHATSAPP_HOOK_EVENTS[:=]\s*"?([a-z.,]+)',
                                       path.read_text(encoding="utf-8"))]
    quoted = [(name, first or second) for name, (first, second) in quoted]
    assert quoted, "the README says which events the webhook subscribes"
    assert all(events == subscribed for _, events in quoted), f"docker-compose.yml subscribes {subscribed}: {quoted}"
