"""The monitoring assets: alert rules and their unit tests run by the real promtool, the Grafana
dashboard against Grafana's own schema, and every metric both use against the gateway's list."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import ROOT, Gateway

PROMETHEUS = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS / "alerts.yml"
RULE_TESTS = PROMETHEUS / "alerts_test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "diffusion-queue.json"

# What the gateway exports at /metrics: name -> (type, labels). The dashboard and the rules may
# use these and Prometheus's own `up`, nothing else.
METRICS: dict[str, tuple[str, frozenset[str]]] = {
    name: (kind, frozenset(labels.split()))
    for name, kind, labels in [
        ("dq_jobs_finished_total", "counter", "model status code"),
        ("dq_job_queue_seconds", "histogram", "model"),
        ("dq_job_run_seconds", "histogram", "model"),
        ("dq_job_e2e_seconds", "histogram", "model"),
        ("dq_job_storage_seconds", "histogram", "model"),
        ("dq_jobs_queued", "gauge", "model priority"),
        ("dq_jobs_running", "gauge", "model"),
        ("dq_backlog_units", "gauge", "model"),
        ("dq_queue_oldest_wait_seconds", "gauge", "model priority"),
        ("dq_queue_target_wait_seconds", "gauge", ""),
        ("dq_dispatches_total", "counter", "model priority"),
        ("dq_limit_rejections_total", "counter", "limit"),
        ("dq_tenant_units_served_total", "counter", "tenant"),
        ("dq_batch_size", "histogram", "model"),
        ("dq_batch_fill_ratio", "histogram", "model"),
        ("dq_step_rows", "histogram", "model"),
        ("dq_worker_images_per_second", "gauge", "worker model"),
        ("dq_worker_state", "gauge", "worker model state"),
        ("dq_worker_heartbeat_age_seconds", "gauge", "worker model"),
        ("dq_workers", "gauge", "model state"),
        ("dq_webhook_deliveries_total", "counter", "outcome attempt"),
        ("dq_reaper_actions_total", "counter", "action"),
        ("dq_http_requests_total", "counter", "route method status"),
        ("dq_http_request_duration_seconds", "histogram", "route method"),
        ("dq_redis_up", "gauge", ""),
        ("dq_scaler_workers_current", "gauge", "model"),
        ("dq_scaler_workers_desired", "gauge", "model"),
    ]
}
SCRAPE_LABELS = frozenset({"instance", "job"})  # what Prometheus adds to every series
PROMETHEUS_OWN = {"up": frozenset()}
# Grafana's variables, as a query of the dashboard would read once Grafana fills them in.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__range": "1h", "$model": ".*"}


def series_names() -> dict[str, frozenset[str]]:
    """Every series name Prometheus stores for the metrics above, with its labels."""
    names: dict[str, frozenset[str]] = dict(PROMETHEUS_OWN)
    for name, (kind, labels) in METRICS.items():
        if kind == "histogram":
            names |= {f"{name}_bucket": labels | {"le"}, f"{name}_sum": labels}
            names[f"{name}_count"] = labels
        else:
            names[name] = labels
    return names


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_queries() -> dict[str, str]:
    """Each panel query by `panel id/refId`, with Grafana's variables filled in."""
    queries = {}
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            queries[f"{panel['id']}/{target['refId']}"] = expr
    return queries


def every_expression() -> dict[str, str]:
    """The alert rules' expressions and the dashboard's queries, by where they come from."""
    rules = {f"alert {r['alert']}": r["expr"] for r in alert_rules()}
    panels = {f"panel {k}": v for k, v in dashboard_queries().items()}
    return rules | panels


# --- promtool --------------------------------------------------------------------------------


def find_promtool() -> str:
    """Debian's promtool (package `prometheus`): on PATH, or where `./dq test` puts it."""
    beside = Path(sys.executable).parent / "promtool"
    found = shutil.which("promtool") or (str(beside) if beside.is_file() else None)
    if found is None:
        pytest.skip(
            "promtool is not installed: `apt-get install prometheus`, or run `./dq test`, which"
            " takes it out of that package into .venv/bin"
        )
    return found


@pytest.fixture(scope="module")
def promtool() -> str:
    """The promtool to run."""
    return find_promtool()


def run_promtool(promtool: str, *args: str, cwd: Path = PROMETHEUS) -> str:
    result = subprocess.run(
        [promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def test_the_alert_rules_pass_promtool_check(promtool: str) -> None:
    output = run_promtool(promtool, "check", "rules", RULES.name)
    assert f"SUCCESS: {len(alert_rules())} rules found" in output


def test_the_alert_unit_tests_pass(promtool: str) -> None:
    assert "SUCCESS" in run_promtool(promtool, "test", "rules", RULE_TESTS.name)


def test_the_compose_prometheus_config_is_valid_and_loads_the_rules(promtool: str) -> None:
    output = run_promtool(promtool, "check", "config", "prometheus.yml")
    assert "SUCCESS: 1 rule files found" in output


def test_every_dashboard_query_parses(promtool: str, tmp_path: Path) -> None:
    """promtool parses each query as the expression of a recording rule."""
    rules = [
        {"record": f"dashboard:panel_{where.replace('/', '_')}", "expr": expr}
        for where, expr in dashboard_queries().items()
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert f"SUCCESS: {len(rules)} rules found" in run_promtool(
        promtool, "check", "rules", str(path), cwd=tmp_path
    )


def test_a_query_that_does_not_parse_is_caught(promtool: str, tmp_path: Path) -> None:
    path = tmp_path / "broken.yml"
    rule = {"record": "broken", "expr": "sum by (model (dq_backlog_units)"}
    path.write_text(yaml.safe_dump({"groups": [{"name": "broken", "rules": [rule]}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True)
    assert result.returncode != 0


def test_every_alert_has_a_unit_test_that_fires_it_and_one_that_does_not() -> None:
    cases = [
        c for t in yaml.safe_load(RULE_TESTS.read_text())["tests"] for c in t["alert_rule_test"]
    ]
    for rule in alert_rules():
        mine = [c for c in cases if c["alertname"] == rule["alert"]]
        assert any(c["exp_alerts"] for c in mine), f"{rule['alert']} is never shown firing"
        assert any(not c["exp_alerts"] for c in mine), f"{rule['alert']} is never shown quiet"


def test_every_alert_says_how_bad_and_what_to_do() -> None:
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert set(rule["annotations"]) == {"summary", "description"}, rule["alert"]


# --- the metric list ---------------------------------------------------------------------------

SELECTOR = re.compile(r"\b([a-z_:][a-z0-9_:]*)\s*\{([^}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
DQ_NAME = re.compile(r"\bdq_[a-z0-9_]+\b")


def metrics_in(expr: str) -> set[str]:
    """The series names a PromQL expression reads."""
    return set(DQ_NAME.findall(expr)) | {name for name, _ in SELECTOR.findall(expr)}


def test_every_metric_used_is_one_the_gateway_exports() -> None:
    known = series_names()
    for where, expr in every_expression().items():
        unknown = metrics_in(expr) - known.keys()
        assert not unknown, f"{where} uses {sorted(unknown)}, not in the metric list"


def test_every_label_used_is_one_the_metric_has() -> None:
    known = series_names()
    for where, expr in every_expression().items():
        for name, matchers in SELECTOR.findall(expr):
            labels = set(MATCHER.findall(matchers))
            assert labels <= known[name] | SCRAPE_LABELS, f"{where}: {name}{{{matchers}}}"
        readable = frozenset().union(*(known[n] for n in metrics_in(expr))) | SCRAPE_LABELS
        for grouping in GROUPING.findall(expr):
            labels = {label.strip() for label in grouping.split(",") if label.strip()}
            assert labels <= readable, f"{where} groups by {sorted(labels - readable)}"


def test_the_metric_check_catches_a_name_not_in_the_list() -> None:
    assert metrics_in('sum(rate(dq_jobs_finshed_total[5m])) / node_load1{job="x"}') == {
        "dq_jobs_finshed_total",
        "node_load1",
    }
    assert "dq_jobs_finshed_total" not in series_names()


def test_the_dashboard_and_rules_cover_the_metrics_operators_need() -> None:
    used = set().union(*(metrics_in(e) for e in every_expression().values()))
    for family in METRICS:
        assert any(u == family or u.startswith(f"{family}_") for u in used), family


@pytest.fixture
def metrics_text(gateway: Gateway) -> str:
    return httpx.get(f"{gateway.url}/metrics", timeout=10).text


def exported_families(text: str) -> dict[str, str]:
    """`# TYPE` lines of the exposition format: every family, with or without samples yet."""
    return dict(re.findall(r"^# TYPE (dq_\w+) (\w+)$", text, re.M))


def test_the_gateway_exports_nothing_outside_the_list(metrics_text: str) -> None:
    for family, kind in exported_families(metrics_text).items():
        name = family if kind != "counter" or family.endswith("_total") else f"{family}_total"
        assert name in METRICS, f"the gateway exports {family}, which the list does not name"
        assert METRICS[name][0] == kind, family


def test_the_gateway_exports_everything_on_the_list(metrics_text: str) -> None:
    families = exported_families(metrics_text)
    exported = {
        f if k != "counter" or f.endswith("_total") else f"{f}_total" for f, k in families.items()
    }
    assert set(METRICS) <= exported


# --- the dashboard -----------------------------------------------------------------------------


def paths(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every leaf of a JSON value with its path."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from paths(item, f"{prefix}/{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from paths(item, f"{prefix}[{i}]")
    else:
        yield prefix, value


def test_the_dashboard_survives_grafanas_own_schema() -> None:
    """Grafana's schema, as the foundation SDK's typed models: a key they do not know is dropped."""
    sdk = pytest.importorskip("grafana_foundation_sdk")
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models.dashboard import Dashboard

    register_default_plugins()
    original = dashboard()
    decoded = json.loads(json.dumps(Dashboard.from_json(original), cls=JSONEncoder))
    assert dict(paths(original)).items() <= dict(paths(decoded)).items(), sdk.__name__


def test_the_schema_check_catches_a_misspelt_key() -> None:
    pytest.importorskip("grafana_foundation_sdk")
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models.dashboard import Dashboard

    register_default_plugins()
    broken = dashboard()
    panel = broken["panels"][1]
    panel["fieldConfig"]["defaults"]["units"] = panel["fieldConfig"]["defaults"].pop("unit", "s")
    decoded = json.loads(json.dumps(Dashboard.from_json(broken), cls=JSONEncoder))
    assert not dict(paths(broken)).items() <= dict(paths(decoded)).items()


def test_the_dashboard_panels_tile_the_grid() -> None:
    panels = dashboard()["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        box = panel["gridPos"]
        assert box["x"] >= 0, panel["title"]
        assert box["x"] + box["w"] <= 24, panel["title"]
        mine = {
            (x, y)
            for x in range(box["x"], box["x"] + box["w"])
            for y in range(box["y"], box["y"] + box["h"])
        }
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine


def test_every_query_uses_the_dashboards_data_source_variable() -> None:
    data = dashboard()
    variables = {v["name"]: v for v in data["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in data["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], panel["title"]
