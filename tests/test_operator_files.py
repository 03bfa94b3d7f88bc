"""The operator's deployment files under config/: Prometheus rules, the Grafana dashboard, the
systemd units and their environment file, the Tor example (README.md, "Deploy").

The rules and the dashboard may name only metrics the server exports: an in-process server's
`/metrics` is the list. promtool (Debian's `prometheus`, installed by `scripts/setup.sh --test`)
must be there in CI; systemd-analyze and tor are used where the machine has them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from anon_ticket.config import Settings, load_settings
from tests.harness import running_server

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "config"
RULES = CONFIG / "prometheus" / "anon-ticket-rules.yml"
PROMETHEUS_EXAMPLE = CONFIG / "prometheus" / "prometheus.example.yml"
DASHBOARD = CONFIG / "grafana" / "anon-ticket-dashboard.json"
UNITS = {name: CONFIG / "systemd" / f"{name}.service"
         for name in ("anon-ticket", "monero-wallet-rpc")}
ENV_EXAMPLE = CONFIG / "systemd" / "anon-ticket.env.example"
TORRC = CONFIG / "tor" / "torrc.example"
IN_CI = os.environ.get("CI", "").lower() in ("true", "1", "yes")


def need_promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if IN_CI:
            pytest.fail("promtool is missing in CI: scripts/setup.sh --test installs Debian's "
                        "`prometheus` package, which provides it")
        pytest.skip("promtool is not installed (scripts/setup.sh --test installs Debian's "
                    "`prometheus` package, which provides it)")
    return path


# --- metric names -------------------------------------------------------------------------

SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created")
# The suffixes a family's samples carry, by the family's type in `# TYPE`.
SUFFIXES_BY_TYPE = {"counter": {"_total"}, "histogram": {"_bucket", "_sum", "_count"},
                    "summary": {"_sum", "_count", ""}, "gauge": {""}, "untyped": {""}}

# PromQL words that can stand before whitespace or `(` without being a metric name.
PROMQL_WORDS = frozenset((
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk",
    "topk", "quantile", "limitk", "limit_ratio", "by", "without", "on", "ignoring", "group_left",
    "group_right", "and", "or", "unless", "bool", "offset", "atan2", "abs", "absent",
    "absent_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min", "day_of_month",
    "day_of_week", "day_of_year", "days_in_month", "delta", "deriv", "exp", "floor",
    "histogram_avg", "histogram_count", "histogram_fraction", "histogram_quantile",
    "histogram_stddev", "histogram_stdvar", "histogram_sum", "holt_winters",
    "double_exponential_smoothing", "hour", "idelta", "increase", "irate", "label_join",
    "label_replace", "ln", "log2", "log10", "minute", "month", "predict_linear", "rate", "resets",
    "round", "scalar", "sgn", "sort", "sort_desc", "sort_by_label", "sort_by_label_desc", "sqrt",
    "time", "timestamp", "vector", "year", "avg_over_time", "min_over_time", "max_over_time",
    "sum_over_time", "count_over_time", "quantile_over_time", "stddev_over_time",
    "stdvar_over_time", "last_over_time", "present_over_time", "mad_over_time", "acos", "acosh",
    "asin", "asinh", "atan", "atanh", "cos", "cosh", "sin", "sinh", "tan", "tanh", "deg", "pi",
    "rad", "start", "end", "inf", "nan",
))
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
# An identifier not inside a number, a duration or a $variable, followed by a selector's
# `{`, a range's `[`, whitespace, `)` or the end.
_IDENT = re.compile(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(?=[{\[)\s]|$)")
_LABEL_VALUES = re.compile(r"label_values\((.*),\s*\w+\s*\)")


def promql_metrics(expr: str) -> set[str]:
    """Metric names an expression selects."""
    text = _GROUPING.sub(" ", _STRING.sub('""', expr))
    return {name for name in _IDENT.findall(text) if name not in PROMQL_WORDS}


def base_name(name: str) -> tuple[str, str]:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)], suffix
    return name, ""


def exported_families(exposition: str) -> dict[str, str]:
    """Base name (suffix stripped) -> type, for every family in a /metrics answer."""
    families: dict[str, str] = {}
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            families[base_name(name)[0]] = kind
        elif line and not line.startswith("#"):
            match = re.match(r"[A-Za-z_:][\w:]*", line)
            assert match is not None, line
            families.setdefault(base_name(match.group())[0], "untyped")
    return families


def unknown_metrics(names: set[str], families: dict[str, str]) -> set[str]:
    """The names that are not series the server exports: an unknown family, or a suffix its
    type does not have (a counter is `_total`, a histogram `_bucket`/`_sum`/`_count`)."""
    bad = set()
    for name in names:
        base, suffix = base_name(name)
        kind = families.get(base)
        if kind is None or suffix not in SUFFIXES_BY_TYPE.get(kind, {""}):
            bad.add(name)
    return bad


def rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(RULES.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def dashboard_panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every panel that shows data; a row is a container (its own panels when collapsed)."""
    out = []
    for panel in panels:
        if panel.get("type") == "row":
            out += dashboard_panels(panel.get("panels", []))
        else:
            out.append(panel)
    return out


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every target and every query variable of the dashboard."""
    dash = json.loads(DASHBOARD.read_text())
    found = [(f"panel {p['title']!r}", t["expr"])
             for p in dashboard_panels(dash["panels"]) for t in p.get("targets", [])]
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            match = _LABEL_VALUES.fullmatch(query.strip())
            found.append((f"variable {var['name']!r}", match.group(1) if match else query))
    return found


def test_promql_metrics_finds_selected_names_only() -> None:
    expr = ('histogram_quantile(0.99, sum by (job, le) (rate(a_seconds_bucket{x=~"b|c"}'
            '[$__rate_interval]))) > 1e-3 and on (instance) b_total offset 5m or sum (c) '
            '/ ignoring(le) group_left (k) d[5m:1m] unless absent(e{f="g h"}) == bool 0')
    assert promql_metrics(expr) == {"a_seconds_bucket", "b_total", "c", "d", "e"}


async def test_rules_and_dashboard_name_only_exported_metrics(tmp_path: Path) -> None:
    async with running_server(tmp_path) as srv:
        exposition = (await srv.internal.get("/metrics")).text
    families = exported_families(exposition)
    assert "api_redeem_requests" in families and "anon_ticket_alerts" in families
    # The check itself: a name the server does not export is caught, as is a wrong suffix.
    assert unknown_metrics({"anon_ticket_bogus_total", "api_redeem_requests",
                            "anon_ticket_storage_commit_seconds_total"}, families) == {
        "anon_ticket_bogus_total", "api_redeem_requests",
        "anon_ticket_storage_commit_seconds_total"}

    in_rules = {rule["alert"]: promql_metrics(rule["expr"]) for rule in rules()}
    assert all(in_rules.values()), [a for a, names in in_rules.items() if not names]
    bad_rules = {alert: sorted(unknown_metrics(names, families))
                 for alert, names in in_rules.items() if unknown_metrics(names, families)}
    assert not bad_rules, f"{RULES.name} names metrics the server does not export: {bad_rules}"

    queries = dashboard_queries()
    bad_panels = {where: sorted(unknown_metrics(promql_metrics(q), families))
                  for where, q in queries if unknown_metrics(promql_metrics(q), families)}
    assert not bad_panels, f"{DASHBOARD.name} names metrics the server does not export: " \
        f"{bad_panels}"
    assert all(promql_metrics(q) for _, q in queries)


# --- Prometheus rules ---------------------------------------------------------------------


def test_promtool_check_rules() -> None:
    promtool = need_promtool()
    done = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_promtool_check_example_config(tmp_path: Path) -> None:
    """The example prometheus.yml with its rules, its token file made up in a temporary
    directory (promtool checks that the file exists)."""
    promtool = need_promtool()
    token = tmp_path / "token"
    token.write_text("0123456789abcdef0123456789abcdef")
    text = PROMETHEUS_EXAMPLE.read_text()
    assert "credentials_file: /etc/prometheus/anon-ticket.token" in text
    (tmp_path / "prometheus.yml").write_text(
        text.replace("/etc/prometheus/anon-ticket.token", str(token)))
    shutil.copy(RULES, tmp_path / RULES.name)
    done = subprocess.run([promtool, "check", "config", "prometheus.yml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    # it scrapes the address the environment example offers for the internal API
    assert env_example(commented=True)["ANON_TICKET_INTERNAL_BIND_ADDRESS"] in text


def test_every_rule_says_what_and_why() -> None:
    names = [rule["alert"] for rule in rules()]
    assert len(set(names)) == len(names) and all(n.startswith("AnonTicket") for n in names)
    for rule in rules():
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
    # each description explains its threshold, so it carries the number
    unexplained = [rule["alert"] for rule in rules()
                   if not re.search(r"\d", rule["annotations"]["description"])]
    assert not unexplained


# promtool unit tests of the expressions' logic (annotations left out: prose is not logic).
S = 'job="at",instance="a"'
LOGIC_TESTS: list[dict[str, Any]] = [
    {  # the wallet fails every tick: unreachable; one success in the window: not
        "interval": "1m",
        "input_series": [
            # a: polls succeed for 10 minutes, then every one fails
            {"series": f'monitor_rpc_calls_total{{{S},result="ok"}}', "values": "0+1x10 10x30"},
            {"series": f'monitor_rpc_calls_total{{{S},result="unavailable"}}',
             "values": "0x10 0+1x30"},
            # b: some fail, some succeed
            {"series": 'monitor_rpc_calls_total{job="at",instance="b",result="timeout"}',
             "values": "0+1x40"},
            {"series": 'monitor_rpc_calls_total{job="at",instance="b",result="ok"}',
             "values": "0+1x40"},
        ],
        "alert_rule_test": [
            # a success within the last 10 minutes, or not 5 minutes more: nothing yet
            {"eval_time": "15m", "alertname": "AnonTicketWalletUnreachable", "exp_alerts": []},
            {"eval_time": "22m", "alertname": "AnonTicketWalletUnreachable", "exp_alerts": []},
            {"eval_time": "30m", "alertname": "AnonTicketWalletUnreachable",
             "exp_alerts": [{"exp_labels": {"severity": "critical", "job": "at",
                                            "instance": "a"}}]},
        ],
    },
    {  # a wallet that never answered since start: no `ok` series at all
        "interval": "1m",
        "input_series": [
            {"series": f'monitor_rpc_calls_total{{{S},result="timeout"}}', "values": "0+1x40"},
        ],
        "alert_rule_test": [
            {"eval_time": "20m", "alertname": "AnonTicketWalletUnreachable",
             "exp_alerts": [{"exp_labels": {"severity": "critical", "job": "at",
                                            "instance": "a"}}]},
        ],
    },
    {
        "interval": "1m",
        "input_series": [
            {"series": f"anon_ticket_last_successful_poll_age_seconds{{{S}}}",
             "values": "1x5 60+60x20"},
        ],
        "alert_rule_test": [
            # above 300 s from 11m on, for 5 minutes
            {"eval_time": "14m", "alertname": "AnonTicketPollStale", "exp_alerts": []},
            {"eval_time": "20m", "alertname": "AnonTicketPollStale",
             "exp_alerts": [{"exp_labels": {"severity": "critical", "job": "at",
                                            "instance": "a"}}]},
        ],
    },
    {  # 10% of redeems are 503s: fires; 10% of a trickle (fewer than 5 in 5 minutes): not
        "interval": "1m",
        "input_series": [
            {"series": f'api_redeem_requests_total{{{S},status="success"}}',
             "values": "0+90x30"},
            {"series": f'api_redeem_requests_total{{{S},status="unavailable"}}',
             "values": "0+10x30"},
            {"series": 'api_redeem_requests_total{job="at",instance="b",status="success"}',
             "values": "0+1x30"},
            {"series": 'api_redeem_requests_total{job="at",instance="b",status="error"}',
             "values": "0+0.2x30"},
        ],
        "alert_rule_test": [
            {"eval_time": "15m", "alertname": "AnonTicketRedeemUnavailable",
             "exp_alerts": [{"exp_labels": {"severity": "critical", "job": "at",
                                            "instance": "a"}}]},
            # a 500 on b, and no token series at all: still reported
            {"eval_time": "15m", "alertname": "AnonTicketInternalErrors",
             "exp_alerts": [{"exp_labels": {"severity": "warning", "job": "at",
                                            "instance": "b"}}]},
        ],
    },
    {  # 1% of redeems pass the Bloom filter and miss: drift
        "interval": "1m",
        "input_series": [
            {"series": f'api_redeem_requests_total{{{S},status="not_found"}}',
             "values": "0+100x120"},
            {"series": f"api_redeem_bloom_db_miss_total{{{S}}}", "values": "0+1x120"},
        ],
        "alert_rule_test": [
            {"eval_time": "100m", "alertname": "AnonTicketBloomFalsePositiveDrift",
             "exp_alerts": [{"exp_labels": {"severity": "warning", "job": "at",
                                            "instance": "a"}}]},
        ],
    },
    {  # commits of about 300 ms
        "interval": "1m",
        "input_series": [
            *({"series": f'anon_ticket_storage_commit_seconds_bucket{{{S},le="{le}"}}',
               "values": "0x30"} for le in ("0.001", "0.1", "0.25")),
            *({"series": f'anon_ticket_storage_commit_seconds_bucket{{{S},le="{le}"}}',
               "values": "0+60x30"} for le in ("1.0", "+Inf")),
        ],
        "alert_rule_test": [
            {"eval_time": "20m", "alertname": "AnonTicketStorageCommitSlow",
             "exp_alerts": [{"exp_labels": {"severity": "warning", "job": "at",
                                            "instance": "a"}}]},
            {"eval_time": "20m", "alertname": "AnonTicketStorageCommitVerySlow",
             "exp_alerts": [{"exp_labels": {"severity": "critical", "job": "at",
                                            "instance": "a"}}]},
        ],
    },
    {
        "interval": "1m",
        "input_series": [
            {"series": f'anon_ticket_alerts_total{{{S},kind="claimed_transfer_vanished"}}',
             "values": "0x10 1x30"},
            {"series": f'anon_ticket_actor_restarts_total{{{S},actor="poller"}}',
             "values": "0x10 5x30"},
            {"series": f"anon_ticket_bloom_entries{{{S}}}", "values": "5x20"},
        ],
        "alert_rule_test": [
            {"eval_time": "15m", "alertname": "AnonTicketClaimedTransferVanished",
             "exp_alerts": [{"exp_labels": {"severity": "critical", "job": "at",
                                            "instance": "a",
                                            "kind": "claimed_transfer_vanished"}}]},
            {"eval_time": "15m", "alertname": "AnonTicketRestartStorm",
             "exp_alerts": [{"exp_labels": {"severity": "warning", "job": "at",
                                            "instance": "a", "actor": "poller"}}]},
            {"eval_time": "15m", "alertname": "AnonTicketMetricsAbsent", "exp_alerts": []},
            # the series ends at 20m; stale after 5 more; absent 5 minutes after that
            {"eval_time": "35m", "alertname": "AnonTicketMetricsAbsent",
             "exp_alerts": [{"exp_labels": {"severity": "critical"}}]},
        ],
    },
]


def test_promtool_rule_logic(tmp_path: Path) -> None:
    promtool = need_promtool()
    data = yaml.safe_load(RULES.read_text())
    for group in data["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(data))
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(
        {"rule_files": ["rules.yml"], "evaluation_interval": "1m", "tests": LOGIC_TESTS}))
    done = subprocess.run([promtool, "test", "rules", "tests.yml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


# --- Grafana dashboard --------------------------------------------------------------------


def test_dashboard_is_an_importable_model() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert [(i["name"], i["type"], i["pluginId"]) for i in dash["__inputs"]] == [
        ("DS_PROMETHEUS", "datasource", "prometheus")]
    assert dash["title"] and dash["uid"] and isinstance(dash["schemaVersion"], int)
    panels = dashboard_panels(dash["panels"])
    assert len(panels) >= 20
    rows = [p for p in dash["panels"] if p.get("type") == "row"]
    ids = [p["id"] for p in rows + panels]
    assert len(set(ids)) == len(ids)
    datasource = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    for panel in panels:
        title = panel.get("title")
        assert title and panel.get("gridPos"), panel
        assert panel.get("datasource") == datasource, title
        assert panel.get("targets"), title
        for target in panel["targets"]:
            assert target.get("expr", "").strip() and target.get("refId"), title
            assert target.get("datasource", datasource) == datasource, title
    for var in dash["templating"]["list"]:
        assert var.get("datasource", datasource) == datasource, var["name"]


# --- systemd units ------------------------------------------------------------------------


def unit_settings(path: Path) -> dict[str, dict[str, list[str]]]:
    """section -> key -> values (in order), continuation lines joined."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    logical = re.sub(r"\\\n\s*", " ", path.read_text())
    for raw in logical.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


HARDENING = {
    "NoNewPrivileges": "yes", "PrivateTmp": "yes", "ProtectSystem": "strict",
    "ProtectHome": "yes", "PrivateDevices": "yes", "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes", "ProtectKernelLogs": "yes", "CapabilityBoundingSet": "",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "SystemCallFilter": "@system-service", "UMask": "0077", "DynamicUser": "yes",
}


@pytest.mark.parametrize("name", sorted(UNITS))
def test_units_are_hardened(name: str) -> None:
    service = unit_settings(UNITS[name])["Service"]
    for key, value in HARDENING.items():
        assert service.get(key) == [value], (key, service.get(key))
    assert "ReadWritePaths" not in service  # StateDirectory= is the only writable data
    assert service["Restart"] == ["on-failure"]


def test_anon_ticket_unit_matches_the_server() -> None:
    service = unit_settings(UNITS["anon-ticket"])["Service"]
    assert service["StateDirectory"][0].split()[0] == "anon-ticket"
    exec_start = service["ExecStart"][0].split()
    assert exec_start[0].endswith("/anon-ticket") and exec_start[-1] == "serve"
    assert exec_start[exec_start.index("--data-dir") + 1] == "/var/lib/anon-ticket"
    assert service["RestartPreventExitStatus"] == ["2"]  # configuration error: exit 2
    assert float(service["TimeoutStopSec"][0]) > Settings().grace_secs
    assert service["LimitNOFILE"] == ["65536"]
    assert service["EnvironmentFile"] == ["/etc/anon-ticket/anon-ticket.env"]
    # the internal socket lives in the unit's RuntimeDirectory
    env = env_example()
    socket = Path(env["ANON_TICKET_INTERNAL_UNIX_SOCKET"])
    assert socket.parent == Path("/run") / service["RuntimeDirectory"][0]


def test_wallet_rpc_unit_is_watch_only_on_loopback() -> None:
    service = unit_settings(UNITS["monero-wallet-rpc"])["Service"]
    args = service["ExecStart"][0].split()
    assert "--non-interactive" in args and "--wallet-file" in args
    assert args[args.index("--rpc-bind-ip") + 1] == "127.0.0.1"
    assert "--daemon-address" in args
    assert "--disable-rpc-login" not in args and "--confirm-external-bind" not in args
    # rpc-login and the wallet password come from the credential config file, not argv
    assert args[args.index("--config-file") + 1] == "%d/wallet-rpc.conf"
    assert service["LoadCredential"][0].startswith("wallet-rpc.conf:")
    port = args[args.index("--rpc-bind-port") + 1]
    assert env_example()["MONERO_RPC_URL"] == f"http://127.0.0.1:{port}/json_rpc"


@pytest.mark.parametrize("name", sorted(UNITS))
def test_systemd_analyze_verify(name: str, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # A binary this machine does not have (/opt/anon-ticket/bin/anon-ticket) is swapped for
    # one it has, so that what is verified is the unit itself.
    text = UNITS[name].read_text()
    binary = re.search(r"^ExecStart=(\S+)", text, re.M)
    assert binary is not None
    if not Path(binary.group(1)).exists():
        base = Path(binary.group(1)).name
        here = Path(sys.executable).parent / base
        stand_in = str(here) if here.exists() else shutil.which(base) or "/bin/true"
        text = text.replace(f"ExecStart={binary.group(1)}", f"ExecStart={stand_in}")
    unit = tmp_path / UNITS[name].name
    unit.write_text(text)
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                          timeout=60)
    ours = [line for line in (done.stdout + done.stderr).splitlines() if unit.name in line]
    assert done.returncode == 0 and not ours, done.stdout + done.stderr


# --- environment file and Tor -------------------------------------------------------------


def env_example(commented: bool = False) -> dict[str, str]:
    pattern = r"^#?([A-Z][A-Z0-9_]*)=(.*)$" if commented else r"^([A-Z][A-Z0-9_]*)=(.*)$"
    return dict(re.findall(pattern, ENV_EXAMPLE.read_text(), re.M))


def test_environment_example_holds_valid_settings(tmp_path: Path) -> None:
    # every name, the commented alternatives too, is a setting's environment variable
    for key in env_example(commented=True):
        if key.startswith("ANON_TICKET_"):
            load_settings({key.removeprefix("ANON_TICKET_").lower(): None}, {}, None)
        else:
            assert key == "MONERO_RPC_URL", key
    env = env_example()
    settings = load_settings({"data_dir": str(tmp_path)}, env, None)
    assert settings.monero_rpc_url == env["MONERO_RPC_URL"]
    assert settings.monero_rpc_login == env["ANON_TICKET_MONERO_RPC_LOGIN"]
    assert settings.internal_socket_path == Path("/run/anon-ticket/internal.sock")
    assert settings.bind_host == "127.0.0.1"
    # the TCP alternative, once switched on, is valid as well
    tcp = {k: v for k, v in env.items() if k != "ANON_TICKET_INTERNAL_UNIX_SOCKET"}
    tcp |= {"ANON_TICKET_INTERNAL_BIND_ADDRESS": "127.0.0.1:9464",
            "ANON_TICKET_INTERNAL_TOKEN": "0123456789abcdef0123456789abcdef"}
    settings = load_settings({"data_dir": str(tmp_path)}, tcp, None)
    assert settings.internal_bind == ("127.0.0.1", 9464)


def test_torrc_serves_only_the_public_api() -> None:
    text = TORRC.read_text()
    ports = re.findall(r"^HiddenServicePort\s+(\d+)\s+(\S+)$", text, re.M)
    assert ports == [("80", env_example()["ANON_TICKET_BIND_ADDRESS"])]
    assert re.search(r"^HiddenServiceVersion 3$", text, re.M)
    assert re.search(r"^HiddenServiceMaxStreams \d+$", text, re.M)


def test_tor_verify_config(tmp_path: Path) -> None:
    tor = shutil.which("tor")
    if tor is None:
        pytest.skip("tor is not installed")
    text = TORRC.read_text()
    torrc = tmp_path / "torrc"
    torrc.write_text(text.replace("/var/lib/tor/anon-ticket/", f"{tmp_path}/hs/")
                     + f"\nDataDirectory {tmp_path}/data\nSocksPort 0\n")
    done = subprocess.run([tor, "--verify-config", "-f", str(torrc)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
