"""The operator's kit in monitoring/: the Grafana dashboard, the Prometheus alert rules, and their wiring.

What an operator would run into: a panel or an alert on a metric the server never exports stays empty or
silent forever, so every metric the dashboard and the rules name must be one the server declares (read from
its registry, so labelled counters that have not fired yet count too). The rules must load in Prometheus
(`promtool check rules`) and fire on what they are named for: promtool's rule unit tests, built here from the
scenarios in ALERT_SCENARIOS. promtool comes from Debian's prometheus package; `./start_webhook_server.sh
test` installs it when missing (as root). Without it the promtool tests skip, except under CI=true, where a
missing promtool is a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import prometheus_client
import pytest

from fakes import waha_payloads as wp
from tests.conftest import post_event
from tests.yaml_subset import read_simple_yaml
from whatsapp_webhook.metrics import ScrapeTimeCollector

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "monitoring"
RULES_FILE = MONITORING / "prometheus" / "whatsapp-webhook.rules.yml"
PROMETHEUS_CONFIG = MONITORING / "prometheus" / "prometheus.yml"
DASHBOARD_FILE = MONITORING / "grafana" / "dashboards" / "whatsapp-webhook.json"
GRAFANA_DATASOURCES = MONITORING / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_DASHBOARDS = MONITORING / "grafana" / "provisioning" / "dashboards" / "whatsapp-webhook.yml"
COMPOSE_FILE = ROOT / "docker-compose.yml"

# Series Prometheus makes itself for every scrape target.
PROMETHEUS_SERIES = {"up"}


# ---------------------------------------------------------------------------
# What the server declares, and what the kit asks for
# ---------------------------------------------------------------------------

def declared_metrics() -> dict[str, set[str]]:
    """Family name -> the series names it exports, from the server's registry and its scrape-time collector."""
    scrape_time = prometheus_client.CollectorRegistry(auto_describe=False)
    scrape_time.register(ScrapeTimeCollector())
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    declared = {}
    for family in [*prometheus_client.REGISTRY.collect(), *scrape_time.collect()]:
        if family.name.startswith("webhook_"):
            declared[family.name] = {family.name + suffix for suffix in suffixes[family.type]}
    # A guard on the reading itself: a labelled counter that never fired is declared all the same.
    assert {"webhook_waha_errors", "webhook_inbox_messages", "webhook_health_check_status"} <= set(declared)
    return declared


def exported_series() -> set[str]:
    return {name for names in declared_metrics().values() for name in names} | PROMETHEUS_SERIES


_PROMQL_WORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "offset",
                 "bool", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: not functions, keywords, label names or durations."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"' r"|'(?:[^'\\]|\\.)*'|`[^`]*`", '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers, Grafana's $job included
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries, $__rate_interval included
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", text):
        if match.group().lower() in _PROMQL_WORDS or text[match.end():].lstrip().startswith("("):
            continue
        names.add(match.group())
    return names


def read_rules() -> list[dict[str, Any]]:
    document = read_simple_yaml(RULES_FILE.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"]]


def read_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression of the dashboard: its panels' targets and its variables' label_values()."""
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            found = re.fullmatch(r"label_values\(\s*(.+?)\s*,\s*\w+\s*\)", variable["query"]["query"])
            assert found, f"variable {variable['name']}: only label_values(metric, label) is read here"
            queries.append(found.group(1))
    return queries


def test_the_promql_reader_finds_metric_names_and_nothing_else() -> None:
    assert promql_metric_names(
        'sum by (reason) (rate(webhook_messages_failed_total{reason="x", job=~"$job"}[$__rate_interval]))'
    ) == {"webhook_messages_failed_total"}
    assert promql_metric_names(
        "histogram_quantile(0.95, sum by (le) (rate(a_bucket[5m]))) > 30\nand sum(rate(a_count[10m])) > 0"
    ) == {"a_bucket", "a_count"}
    assert promql_metric_names('up{job="w"} == 0') == {"up"}
    assert promql_metric_names("deriv(sum(x)[15m:1m]) > 0 and sum(x offset 15m) < 1e3") == {"x"}
    assert promql_metric_names("sum(x) / on() group_left sum(y) unless z or 60 * w") == {"x", "y", "z", "w"}


def test_every_metric_the_dashboard_and_the_rules_query_is_one_the_server_declares() -> None:
    exported = exported_series()
    for where, queries in (("dashboard", dashboard_queries(read_dashboard())),
                           ("alert rules", [rule["expr"] for rule in read_rules()])):
        assert queries, where
        for query in queries:
            names = promql_metric_names(query)
            assert names, f"{where}: no metric found in {query!r}"
            unknown = names - exported
            assert not unknown, f"{where}: {query!r} asks for {sorted(unknown)}, which the server never exports"


def test_every_metric_the_server_declares_has_a_panel() -> None:
    shown = {name for query in dashboard_queries(read_dashboard()) for name in promql_metric_names(query)}
    missing = [family for family, names in declared_metrics().items() if not names & shown]
    assert not missing, f"metrics no dashboard panel shows: {missing}"


# What an operator watches (issue 14), each as (metric, labels it must be broken down by).
WATCHED = {
    "replies by outcome": [("webhook_messages_processed_total", ()), ("webhook_messages_failed_total", ("reason",)),
                           ("webhook_messages_skipped_total", ())],
    "LLM latency": [("webhook_llm_duration_seconds_bucket", ("le",))],
    "LLM errors": [("webhook_llm_errors_total", ("status",))],
    "WAHA errors": [("webhook_waha_errors_total", ("endpoint", "status"))],
    "ignored by reason": [("webhook_messages_ignored_total", ("reason",))],
    "replies in flight": [("webhook_replies_in_flight", ())],
    "inbox backlog": [("webhook_inbox_messages", ("status",))],
    "cost": [("webhook_llm_cost_usd_total", ())],
    "health checks": [("webhook_health_check_status", ("check",))],
}


def test_the_dashboard_shows_what_an_operator_watches() -> None:
    queries = dashboard_queries(read_dashboard())
    for topic, wanted in WATCHED.items():
        for metric, labels in wanted:
            grouped = [q for q in queries if metric in promql_metric_names(q)
                       and all(re.search(rf"\bby \([^)]*\b{label}\b", q) for label in labels)]
            assert grouped, f"{topic}: no panel shows {metric}" + (f" by {', '.join(labels)}" if labels else "")


def test_the_dashboard_is_ready_for_provisioning() -> None:
    dashboard = read_dashboard()
    text = DASHBOARD_FILE.read_text(encoding="utf-8")
    # Provisioned dashboards are never "imported": an exported ${DS_...} input would leave every panel empty.
    assert "__inputs" not in dashboard and "${DS_" not in text
    assert dashboard["id"] is None and re.fullmatch(r"[a-z0-9-]{1,40}", dashboard["uid"]) and dashboard["title"]
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = dashboard["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels), "panel ids must be unique"
    assert len({panel["title"] for panel in panels}) == len(panels), "two panels with one title confuse readers"
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and panel["description"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"] and target["expr"].strip(), panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, f"{panel['title']} leaves the 24-column grid"
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


# ---------------------------------------------------------------------------
# Alert rules
# ---------------------------------------------------------------------------

def promtool() -> str:
    found = shutil.which("promtool")
    if found:
        return found
    message = ("promtool is not installed (Debian: apt-get install prometheus; "
               "./start_webhook_server.sh test installs it as root)")
    if os.environ.get("CI") == "true":
        pytest.fail(message + ": under CI=true these checks must run, not skip")
    pytest.skip(message)


def test_every_alert_says_how_severe_it_is_and_what_to_do() -> None:
    rules = read_rules()
    names = [rule["alert"] for rule in rules]
    assert len(set(names)) == len(names), "alert names must be unique"
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_the_server_down_alert_watches_the_job_prometheus_scrapes() -> None:
    config = read_simple_yaml(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))
    (job,) = config["scrape_configs"]
    (down,) = [rule for rule in read_rules() if rule["alert"] == "WebhookDown"]
    assert f'up{{job="{job["job_name"]}"}}' in down["expr"]
    assert job["metrics_path"] == "/metrics"
    for rule_file in config["rule_files"]:
        assert (PROMETHEUS_CONFIG.parent / rule_file).resolve() == RULES_FILE


def test_promtool_accepts_the_rules_and_the_prometheus_config() -> None:
    binary = promtool()
    for command in (["check", "rules", str(RULES_FILE)], ["check", "config", str(PROMETHEUS_CONFIG)]):
        result = subprocess.run([binary, *command], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SUCCESS" in result.stdout + result.stderr


TARGET = 'job="whatsapp-webhook", instance="webhook:5002"'
TARGET_LABELS = {"job": "whatsapp-webhook", "instance": "webhook:5002"}
QUIET = None
HEALTH = "webhook_health_check_status"
BUCKET = "webhook_processing_duration_seconds_bucket"


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    """One input series of the scrape target, in promtool's notation: {'name{labels}': '0+1x10'}."""
    matchers = [f'{key}="{value}"' for key, value in labels.items()] + [TARGET]
    return {f"{name}{{{', '.join(matchers)}}}": values}


def durations(under_30s: str, under_60s: str) -> dict[str, str]:
    """Reply-time histogram series: how many replies took up to 30 s, and up to 60 s (and at all)."""
    return {**series(BUCKET, under_30s, le="30"), **series(BUCKET, under_60s, le="60"),
            **series(BUCKET, under_60s, le="+Inf"),
            **series("webhook_processing_duration_seconds_count", under_60s)}


# alert -> (input series, minute to look, the labels the alert carries besides its own, or QUIET). The quiet
# cases are the near misses an operator must not be woken up for.
ALERT_SCENARIOS: dict[str, list[tuple[dict[str, str], int, dict[str, str] | None]]] = {
    "WebhookDown": [(series("up", "1 1 0x6"), 5, TARGET_LABELS), (series("up", "1 1 0x6"), 3, QUIET)],
    "WebhookStoreFailing": [(series(HEALTH, "0 0 2x5", check="store"), 5, {}),
                            (series(HEALTH, "0x10", check="store"), 5, QUIET)],
    "WebhookRepliesUndelivered": [(series("webhook_messages_failed_total", "0 0 1x5", reason="undelivered"), 4, {}),
                                  (series("webhook_messages_failed_total", "0+1x10", reason="llm"), 8, QUIET)],
    "WebhookRepliesFailing": [
        ({**series("webhook_messages_received_total", "0+10x40"),
          **series("webhook_messages_failed_total", "0+2x40", reason="llm")}, 35, {}),
        ({**series("webhook_messages_received_total", "0+10x40"),
          **series("webhook_messages_failed_total", "0+0.5x40", reason="llm")}, 35, QUIET),
        # 100% failing, but a single message a minute is below the volume worth waking someone for.
        ({**series("webhook_messages_received_total", "0+1x40"),
          **series("webhook_messages_failed_total", "0+1x40", reason="llm")}, 35, QUIET)],
    "WebhookLLMFailing": [(series(HEALTH, "2x10", check="llm"), 7, {}),
                          (series(HEALTH, "1x10", check="llm"), 7, QUIET)],
    "WebhookLLMDegraded": [(series(HEALTH, "1x20", check="llm"), 17, {}),
                           (series(HEALTH, "0x20", check="llm"), 17, QUIET)],
    "WebhookLLMModelUnavailable": [
        (series("webhook_llm_model_unavailable_total", "0 1 2 3", model="google/gemini-2.0-flash-001"), 3,
         {"model": "google/gemini-2.0-flash-001"}),
        (series("webhook_llm_model_unavailable_total", "3x10", model="google/gemini-2.0-flash-001"), 8, QUIET)],
    "WebhookLLMRateLimited": [(series("webhook_llm_errors_total", "0+2x30", status="429"), 25, {}),
                              (series("webhook_llm_errors_total", "0+0.5x30", status="429"), 25, QUIET)],
    "WebhookWAHAFailing": [(series(HEALTH, "2x6", check="waha"), 4, {}),
                           (series(HEALTH, "1x6", check="waha"), 4, QUIET)],
    "WebhookWAHADegraded": [(series(HEALTH, "1x15", check="waha"), 12, {}),
                            (series(HEALTH, "0x15", check="waha"), 12, QUIET)],
    "WebhookWAHAErrors": [
        (series("webhook_waha_errors_total", "0+1x20", endpoint="/api/sendText", status="422"), 16, {"status": "422"}),
        # Typing indicators failing never keep a reply from going out.
        (series("webhook_waha_errors_total", "0+1x20", endpoint="/api/startTyping", status="500"), 16, QUIET)],
    "WebhookInboxBacklogGrowing": [(series("webhook_inbox_messages", "0+2x40", status="queued"), 30, {}),
                                   (series("webhook_inbox_messages", "50x40", status="queued"), 30, QUIET)],
    "WebhookRepliesStuck": [(series("webhook_replies_in_flight", "25x20"), 16, TARGET_LABELS),
                            (series("webhook_replies_in_flight", "25x10 5 25x10"), 20, QUIET)],
    "WebhookSignatureRejected": [(series("webhook_requests_rejected_total", "0+1x10", status="401"), 8, {}),
                                 (series("webhook_requests_rejected_total", "0+1x10", status="400"), 8, QUIET)],
    "WebhookSlow": [(durations("0x30", "0+1x30"), 25, {}), (durations("0+1x30", "0+1x30"), 25, QUIET)],
}


def expected_alert(rule: dict[str, Any], labels: dict[str, str]) -> dict[str, Any]:
    """What promtool should report: the given labels plus the rule's own, and its annotations with labels filled in."""
    labels = {**labels, **rule["labels"]}
    annotations = {key: re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], value)
                   for key, value in rule["annotations"].items()}
    assert not any("{{" in value for value in annotations.values()), "only {{ $labels.x }} is filled in here"
    return {"exp_labels": labels, "exp_annotations": annotations}


def test_every_alert_has_scenarios_on_series_the_server_exports() -> None:
    assert set(ALERT_SCENARIOS) == {rule["alert"] for rule in read_rules()}
    exported = exported_series()
    for alert, scenarios in ALERT_SCENARIOS.items():
        outcomes = [labels is not QUIET for _, _, labels in scenarios]
        assert any(outcomes) and not all(outcomes), f"{alert} needs a case that fires and one that must not"
        for series, _, _ in scenarios:
            assert {name.split("{")[0] for name in series} <= exported, alert


def test_each_alert_fires_on_what_it_is_named_for_and_not_on_the_near_misses(tmp_path: Path) -> None:
    binary = promtool()
    rules = {rule["alert"]: rule for rule in read_rules()}
    tests = []
    for alert, scenarios in ALERT_SCENARIOS.items():
        for series, minute, labels in scenarios:
            tests.append({
                "interval": "1m",
                "input_series": [{"series": name, "values": values} for name, values in series.items()],
                "alert_rule_test": [{"eval_time": f"{minute}m", "alertname": alert,
                                     "exp_alerts": [] if labels is QUIET else [expected_alert(rules[alert], labels)]}],
            })
    unit_tests = tmp_path / "whatsapp-webhook.rules.test.yml"  # JSON is YAML
    unit_tests.write_text(json.dumps({"rule_files": [str(RULES_FILE)], "evaluation_interval": "1m",
                                      "tests": tests}, indent=1), encoding="utf-8")
    result = subprocess.run([binary, "test", "rules", str(unit_tests)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_servers_metrics_pass_promtools_lint(client, upstreams) -> None:
    binary = promtool()
    post_event(client, wp.text_message("WEBJS"))
    post_event(client, wp.message_ack("WEBJS"))
    exposition = client.get("/metrics").get_data(as_text=True)
    assert "webhook_inbox_messages{" in exposition and "webhook_health_check_status{" in exposition
    result = subprocess.run([binary, "check", "metrics"], input=exposition, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------
# docker-compose.yml's monitoring profile
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    return read_simple_yaml(COMPOSE_FILE.read_text(encoding="utf-8"))["services"]


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> what is mounted there (a ./folder of this repository or a named volume)."""
    found = {}
    for volume in service["volumes"]:
        source, target = volume.split(":")[:2]
        found[target] = source
    return found


def test_prometheus_gets_this_folder_and_scrapes_the_webhook_service(services: dict[str, Any]) -> None:
    prometheus = services["prometheus"]
    config_flag = next(arg for arg in prometheus["command"] if arg.startswith("--config.file="))
    config_path = Path(config_flag.split("=", 1)[1])
    folder = mounts(prometheus)[str(config_path.parent)]
    assert (ROOT / folder).resolve() == PROMETHEUS_CONFIG.parent and config_path.name == PROMETHEUS_CONFIG.name
    config = read_simple_yaml(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))
    (job,) = config["scrape_configs"]
    (target,) = [t for group in job["static_configs"] for t in group["targets"]]
    host, port = target.split(":")
    assert host == "webhook" and port == services["webhook"]["environment"]["WEBHOOK_PORT"]
    assert mounts(prometheus)["/prometheus"] in read_simple_yaml(COMPOSE_FILE.read_text("utf-8"))["volumes"]


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard(services: dict[str, Any]) -> None:
    grafana = services["grafana"]
    grafana_mounts = mounts(grafana)
    assert (ROOT / grafana_mounts["/etc/grafana/provisioning"]).resolve() == GRAFANA_DATASOURCES.parent.parent
    (datasource,) = read_simple_yaml(GRAFANA_DATASOURCES.read_text(encoding="utf-8"))["datasources"]
    url = urlparse(datasource["url"])
    prometheus_ports = [int(port.split(":")[-1]) for port in services["prometheus"]["ports"]]
    assert datasource["type"] == "prometheus" and url.hostname == "prometheus" and url.port in prometheus_ports
    (provider,) = read_simple_yaml(GRAFANA_DASHBOARDS.read_text(encoding="utf-8"))["providers"]
    folder = grafana_mounts[provider["options"]["path"]]
    assert (ROOT / folder).resolve() == DASHBOARD_FILE.parent
    home = Path(grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert grafana_mounts[str(home.parent)] == folder and (DASHBOARD_FILE.parent / home.name).is_file()
    assert grafana["depends_on"] == ["prometheus"]
