"""Monitoring that ops can run as shipped: alert rules, their unit tests, the dashboard.

``promtool`` (Debian's ``prometheus`` package, installed by ``make test``) checks the rule
file and runs its unit tests (deploy/alerts.test.yml), lints a live scrape of /metrics,
and parses every dashboard query. The metric names and label values that the rules and
panels use are compared with what a scrape of the running app really returns, so a
renamed metric or a misspelt label value breaks a test, not a dashboard at 3 a.m.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml  # type: ignore[import-untyped]
from helpers import blast, editor_token, publish, seed_subscribers, wait_status
from prometheus_client.parser import text_string_to_metric_families
from smtpserver import SmtpServer

from mailer.config import Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "alerts.yml"
ALERT_TESTS = DEPLOY / "alerts.test.yml"
PROMETHEUS = DEPLOY / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "mailer.json"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "mailer.yml"
COMPOSE = ROOT / "docker-compose.yml"
MONITORING_DOC = ROOT / "docs" / "monitoring.md"

# What must page someone (issue 14): no worker, a stalled blast, bounce and complaint
# rates, SMTP deferrals, Redis/SQL down; also the scrape itself failing and a blast left
# paused (the app pauses blasts by itself).
ALERT_NAMES = {
    "MailerDown",
    "MailerDependencyDown",
    "MailerNoWorkerAlive",
    "MailerBlastStalled",
    "MailerSmtpTransientFailures",
    "MailerBlastPaused",
    "MailerHardBounceRateHigh",
    "MailerComplaintRateHigh",
}
# Metrics of the bounce pipeline (issue 14), written against its announced names before
# /metrics exports them. The live test fails once a scrape contains one of them, so the
# allowance is removed as soon as it is no longer needed.
NOT_YET_EXPORTED = {"mailer_bounces_total", "mailer_complaints_total"}
# Series Prometheus makes itself for every scrape target; alert rules may use them.
SCRAPE_SERIES = {"up"}
GRAFANA_VARIABLES = re.compile(
    r"\$__(rate_interval|interval|range)|\$\{__(rate_interval|interval|range)\}"
)

PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
    "count_values", "group", "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "bool", "offset", "inf", "nan", "atan2",
}  # fmt: skip


def promtool(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    assert shutil.which("promtool"), "promtool missing: `make test` installs Debian's prometheus"
    return subprocess.run(
        ["promtool", *args],
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of every panel, Grafana's $__ variables filled."""
    return [
        (p["title"], GRAFANA_VARIABLES.sub("5m", t["expr"])) for p in panels() for t in p["targets"]
    ]


def _strip(expr: str) -> str:
    """The expression without strings, label matchers, ranges and label lists."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    return re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)


def metric_names(expr: str) -> set[str]:
    """Names of the series a PromQL expression selects (functions and keywords left out)."""
    stripped = _strip(expr)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[a-zA-Z_:][a-zA-Z0-9_:]*", stripped):
        word = match.group(0)
        if stripped[match.end() :].lstrip().startswith("(") or word.lower() in PROMQL_WORDS:
            continue
        names.add(word)
    return names


def label_values(expr: str) -> list[tuple[str, str, set[str]]]:
    """(metric, label, values) for each ``label="v"`` or ``label=~"v1|v2"`` matcher."""
    out = []
    for metric, matchers in re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}", expr):
        for label, op, value in re.findall(r'(\w+)\s*(=~|=)\s*"([^"]*)"', matchers):
            values = set(value.split("|")) if op == "=~" else {value}
            assert all(re.fullmatch(r"[\w:.-]+", v) for v in values), (expr, value)
            out.append((metric, label, values))
    return out


def test_promql_name_extraction_sees_what_a_query_selects() -> None:
    expr = (
        'sum by (le) (rate(foo_bucket{a="b", c=~"x|y"}[5m])) / ignoring(kind) group_left() '
        "sum(increase(bar_total[1h] offset 5m)) > 0.5 and on() (baz or vector(0)) == 1e3"
    )
    assert metric_names(expr) == {"foo_bucket", "bar_total", "baz"}
    assert label_values(expr) == [("foo_bucket", "a", {"b"}), ("foo_bucket", "c", {"x", "y"})]


# Alert rules --------------------------------------------------------------------------


def test_alert_rules_pass_promtool_check() -> None:
    checked = promtool("check", "rules", str(ALERTS))
    print(checked.stdout, checked.stderr)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in checked.stdout


def test_every_alert_has_a_delay_severity_summary_and_runbook() -> None:
    rules = alert_rules()
    assert {r["alert"] for r in rules} == ALERT_NAMES
    doc = MONITORING_DOC.read_text()
    for rule in rules:
        name = rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), name
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        notes = rule["annotations"]
        assert notes["summary"] and len(notes["description"]) > 80, name
        # The runbook line points at the doc's section on this alert, which exists.
        assert notes["runbook"].startswith(f"docs/monitoring.md#{name.lower()}:"), name
        assert re.search(rf"^### {name}$", doc, re.M), f"docs/monitoring.md lacks ### {name}"
    by_name = {r["alert"]: r for r in rules}
    # The thresholds are the blast auto-pause settings' defaults.
    assert "> 0.05\n" in by_name["MailerHardBounceRateHigh"]["expr"]
    assert (
        "MAILER_BOUNCE_PAUSE_RATE"
        in by_name["MailerHardBounceRateHigh"]["annotations"]["description"]
    )
    assert "> 0.003\n" in by_name["MailerComplaintRateHigh"]["expr"]
    assert (
        "MAILER_COMPLAINT_PAUSE_RATE"
        in by_name["MailerComplaintRateHigh"]["annotations"]["description"]
    )


def test_alert_unit_tests_show_each_alert_firing_and_quiet() -> None:
    result = promtool("test", "rules", str(ALERT_TESTS))
    print(result.stdout, result.stderr)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout

    spec = load_yaml(ALERT_TESTS)
    assert spec["rule_files"] == ["alerts.yml"]
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in spec["tests"]:
        for check in case["alert_rule_test"]:
            (fired if check["exp_alerts"] else quiet).add(check["alertname"])
    assert fired == ALERT_NAMES, f"never shown firing: {ALERT_NAMES - fired}"
    assert quiet == ALERT_NAMES, f"never shown staying quiet: {ALERT_NAMES - quiet}"


def test_prometheus_loads_the_rules_in_compose() -> None:
    checked = promtool("check", "config", str(PROMETHEUS))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "1 rule files found" in checked.stdout
    assert load_yaml(PROMETHEUS)["rule_files"] == ["alerts.yml"]
    # In the container the rules sit beside the config, where the relative path points.
    volumes = load_yaml(COMPOSE)["services"]["prometheus"]["volumes"]
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in volumes
    assert "./deploy/alerts.yml:/etc/prometheus/alerts.yml:ro" in volumes


# Grafana --------------------------------------------------------------------------------


def test_dashboard_shows_what_ops_watch() -> None:
    board = dashboard()
    assert board["uid"] and board["title"] == "mailer"
    shown = panels()
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    cells = [
        (p["title"], x, y)
        for p in board["panels"]
        for x in range(p["gridPos"]["x"], p["gridPos"]["x"] + p["gridPos"]["w"])
        for y in range(p["gridPos"]["y"], p["gridPos"]["y"] + p["gridPos"]["h"])
    ]
    assert all(x < 24 for _, x, _ in cells), "Grafana's grid is 24 columns wide"
    taken = [(x, y) for _, x, y in cells]
    assert len(taken) == len(set(taken)), "panels overlap"
    [datasource] = load_yaml(DATASOURCES)["datasources"]
    for panel in shown:
        assert panel["targets"], panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": datasource["uid"]}
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == datasource["uid"], panel["title"]
    used = set().union(*(metric_names(q) for _, q in panel_queries()))
    for needed in (
        "mailer_send_rate_per_second",  # send rate
        "mailer_queue_jobs",  # queue depth
        "mailer_messages_total",  # message outcomes
        "mailer_jobs_total",  # job outcomes
        "mailer_bounces_total",  # bounce rate
        "mailer_complaints_total",  # complaint rate
        "mailer_smtp_transaction_seconds_bucket",  # SMTP latency quantiles
        "mailer_workers_alive",  # worker count
    ):
        assert needed in used, f"no panel shows {needed}"
    quantiles = {
        m for _, q in panel_queries() for m in re.findall(r"histogram_quantile\(([0-9.]+)", q)
    }
    assert quantiles >= {"0.5", "0.95", "0.99"}


def test_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    # promtool parses expressions in rule files: one recording rule per panel query.
    rules = [
        {"record": f"dashboard:query_{i}", "expr": expr}
        for i, (_, expr) in enumerate(panel_queries())
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = promtool("check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rules)} rules found" in checked.stdout


def test_grafana_in_compose_is_pinned_local_and_provisioned() -> None:
    services = load_yaml(COMPOSE)["services"]
    grafana = services["grafana"]
    assert grafana["profiles"] == ["monitoring"]
    assert re.fullmatch(r"grafana/grafana-oss:\d+\.\d+\.\d+", grafana["image"]), grafana["image"]
    assert grafana["ports"] and all(str(p).startswith("127.0.0.1:") for p in grafana["ports"])
    mounts = {str(v).split(":")[0]: str(v).split(":")[1] for v in grafana["volumes"]}
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    [provider] = load_yaml(DASHBOARD_PROVIDERS)["providers"]
    dashboards_dir = provider["options"]["path"]
    assert mounts["./deploy/grafana/mailer.json"] == f"{dashboards_dir}/mailer.json"
    [datasource] = load_yaml(DATASOURCES)["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"  # the compose service
    assert "prometheus" in services and "prometheus" in grafana["depends_on"]


# Against a live scrape -------------------------------------------------------------------


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # SQL only counts rows here
async def test_live_scrape_passes_promtool_and_has_every_series_rules_and_panels_use(
    live: httpx.AsyncClient, smtp: SmtpServer, settings: Settings, start_worker: Any
) -> None:
    # A small blast with a refusal and a deferral, so every outcome series exists.
    people = await seed_subscribers(settings, confirmed=6)
    refused, deferred = people["confirmed"][:2]

    def plan(rcpt: str, attempt: int) -> str | None:
        if rcpt == refused:
            return "550 5.1.1 no such user"
        return "451 4.7.1 greylisted" if rcpt == deferred and attempt == 1 else None

    smtp.recorder.plan = plan
    token = await editor_token(settings)
    await start_worker()
    bid = await blast(live, token, await publish(live, token))
    done = await wait_status(live, token, bid, "done", timeout=30)
    assert done["sent"] == 5 and done["failed"] == 1

    r = await live.get("/metrics")
    assert r.status_code == 200
    lint = promtool("check", "metrics", stdin=r.content)
    print("promtool check metrics:", lint.returncode, lint.stdout, lint.stderr)
    assert lint.returncode == 0 and not lint.stdout.strip(), lint.stdout + lint.stderr

    scraped: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            scraped.setdefault(sample.name, []).append(dict(sample.labels))
    exported = set(scraped)
    assert not exported & NOT_YET_EXPORTED, (
        f"{exported & NOT_YET_EXPORTED} are exported now: remove them from NOT_YET_EXPORTED"
    )

    queries = [(f"panel {title!r}", q) for title, q in panel_queries()]
    queries += [(f"alert {rule['alert']}", rule["expr"]) for rule in alert_rules()]
    for where, expr in queries:
        allowed = (
            exported | NOT_YET_EXPORTED | (SCRAPE_SERIES if where.startswith("alert") else set())
        )
        unknown = metric_names(expr) - allowed
        assert not unknown, f"{where} uses {unknown}, which mailer does not export"
        for metric, label, values in label_values(expr):
            if metric in NOT_YET_EXPORTED or metric in SCRAPE_SERIES:
                continue
            seen = {labels.get(label) for labels in scraped[metric]}
            assert values <= seen, f"{where}: {metric}{{{label}}} has {seen}, not {values - seen}"
