"""The benchmark's report: targets with pass/fail, the JSON file and a readable table."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tests.bench import SECTIONS

# Scenario ids, in the order the table shows them, with their labels.
SCENARIOS: dict[str, str] = {
    "quart_ceiling": "ceiling: trivial quart-trio JSON POST",
    "raw_asgi_ceiling": "ceiling: raw ASGI (hypercorn trio)",
    "quart_hop": "reference: quart-trio + one mailbox hop",
    "new_claims": "redeem: new claim (fresh PID)",
    "already_claimed": "redeem: already_claimed retry",
    "already_claimed_uncached": "redeem: already_claimed, not cached",
    "bloom_negative": "redeem: unknown PID (Bloom negative)",
    "invalid_pid": "redeem: invalid PID",
    "token": "token introspection (GET)",
}
TARGET_LEVEL = 64
# The quart-trio ceiling's CPU per request on the reference machine the absolute targets were
# set on (about 1.6k req/s on one core at 64 connections, about 0.6 ms of CPU a request).
REFERENCE_CEILING_CPU_US = 600.0


@dataclass
class Target:
    id: str
    what: str
    value: float | None
    op: str  # ">=" or "<="
    threshold: float
    unit: str = ""
    note: str = ""

    @property
    def passed(self) -> bool | None:
        if self.value is None:
            return None
        return self.value >= self.threshold if self.op == ">=" else self.value <= self.threshold

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["pass"] = self.passed
        return d


def cell_at(report: dict[str, Any], scenario: str, level: int) -> dict[str, Any] | None:
    cells = report.get("http", {}).get("scenarios", {}).get(scenario, {})
    cell: dict[str, Any] | None = cells.get(str(level))
    return cell


def evaluate_targets(report: dict[str, Any]) -> list[Target]:
    """Every target of the issue, from the figures in `report` (None when not measured)."""
    targets: list[Target] = []

    def ratio(scenario: str) -> float | None:
        cell = cell_at(report, scenario, TARGET_LEVEL)
        return cell.get("ratio_to_quart") if cell else None

    for scenario, threshold in (("new_claims", 0.85), ("already_claimed", 0.85),
                                ("token", 0.85), ("bloom_negative", 0.9),
                                ("invalid_pid", 0.9)):
        targets.append(Target(
            f"throughput.{scenario}", f"{SCENARIOS[scenario]}: req/s at {TARGET_LEVEL} "
            "connections / quart-trio ceiling", ratio(scenario), ">=", threshold, "x"))
    for scenario in ("new_claims", "already_claimed", "bloom_negative", "invalid_pid",
                     "token"):
        cell = cell_at(report, scenario, TARGET_LEVEL)
        targets.append(Target(
            f"tail.{scenario}", f"{SCENARIOS[scenario]}: (p99/p50) / ceiling's (p99/p50) at "
            f"{TARGET_LEVEL} connections", cell.get("tail_to_quart") if cell else None,
            "<=", 1.2, "x"))
    storage = report.get("storage", {})
    targets.append(Target(
        "storage.vs_raw_batched", "storage, group commit / the same claim statements on a bare "
        "connection at its mean batch, claims per second of transaction time",
        storage.get("group_commit_to_raw_batched"), ">=", 0.7, "x",
        note="the server's own timing of its transactions (/metrics) against the floor's"))
    targets.append(Target(
        "storage.vs_one_per_tx", "storage, group commit / --batch-limit 1 (one transaction a "
        "claim), claims per second of transaction time",
        storage.get("group_commit_to_one_per_tx"), ">=", 1.5, "x"))
    ingest = report.get("ingestion", {})
    targets.append(Target(
        "ingestion.rate", "ingestion, a catch-up from the wallet, transfers per server CPU "
        "second", ingest.get("transfers_per_s"), ">=", 20_000, "transfers/s",
        note=f"over {ingest.get('transfers', '?')} transfers; the bare-SQL floor of the same "
             f"statements: {ingest.get('raw_sql_per_cpu_s', '?')} per CPU second"))
    ws = report.get("websocket", {})
    idle = ws.get("idle_subscribers", 1000)
    targets.append(Target(
        "websocket.idle_cost", f"redeem (new claims) req/s with {idle} idle websocket "
        "subscribers / without", ws.get("ratio_idle_to_none"), ">=", 0.9, "x"))
    stuck = ws.get("stuck_watcher") or {}
    targets.append(Target(
        "websocket.stuck_cost", "redeem (new claims) req/s with a watcher that stopped reading "
        "/ with one that reads, their ticket topped up every poller tick",
        stuck.get("ratio_stuck_to_reading"), ">=", 0.9, "x",
        note="a writer spinning on the stuck one's full socket would take the server's core"))
    fan = (ws.get("fanout") or {}).get("from_send_ms") or {}
    targets.append(Target(
        "websocket.fanout_p99", f"redeem sent -> `claimed` event received, p99, with {idle} "
        "idle subscribers", fan.get("p99"), "<=", 50.0, "ms",
        note="an upper bound of commit -> event received"))
    mem = report.get("memory_startup", {})
    pids = mem.get("recorded_pids")
    targets.append(Target(
        "startup.rss", f"RSS once ready with {pids or '?'} recorded PIDs, Bloom at 1e-6",
        mem.get("rss_mb"), "<=", 150, "MB", note="MB = 10^6 bytes"))
    targets.append(Target(
        "startup.ready", f"time to ready with {pids or '?'} recorded PIDs",
        mem.get("ready_s"), "<=", 5.0, "s", note="process spawn to /healthz 200"))
    return targets


QUICK_NOTE = ("--quick is a smoke test: one 2 s run a scenario, the ceiling only first and "
              "last, small samples; on a shared machine its ratios move by +-0.2 from run to "
              "run. The targets are judged on the full run.")


def finish(report: dict[str, Any]) -> dict[str, Any]:
    targets = evaluate_targets(report)
    report["targets"] = [t.as_dict() for t in targets]
    report["summary"] = {
        "passed": sum(1 for t in targets if t.passed is True),
        "failed": sum(1 for t in targets if t.passed is False),
        "not_measured": sum(1 for t in targets if t.passed is None),
        "failed_ids": [t.id for t in targets if t.passed is False],
        # runs whose request lines ran out (each sent once): ended early, measured over the
        # time they ran; listed in `short_runs`
        "short_runs": len(report.get("short_runs", [])),
    }
    if report.get("meta", {}).get("mode") == "quick":
        report["summary"]["note"] = QUICK_NOTE
    return report


def write_json(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")


# --- the table ------------------------------------------------------------------------------


def _fmt(value: Any, spec: str = "", none: str = "-") -> str:
    if value is None:
        return none
    if isinstance(value, float | int) and spec:
        return format(value, spec)
    return str(value)


def _table(headers: list[str], rows: list[list[str]], align: str) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        out = []
        for i, c in enumerate(cells):
            out.append(c.ljust(widths[i]) if align[i] == "l" else c.rjust(widths[i]))
        return "  ".join(out).rstrip()

    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def _measured(report: dict[str, Any], name: str) -> dict[str, Any]:
    """A section's figures, or {} when it was not run or failed (said once at the end)."""
    section: dict[str, Any] = report.get(name, {})
    return {} if "status" in section or "error" in section else section


def render(report: dict[str, Any]) -> str:
    out: list[str] = []
    meta = report.get("meta", {})
    out.append(f"anon-ticket bench ({meta.get('mode', '?')}), {meta.get('started_at', '')}, "
               f"{meta.get('duration_s', '?')} s")
    out.append(f"machine: {meta.get('cpu_model', '?')}, {meta.get('cpus', '?')} cpus; "
               f"{meta.get('pinning', {}).get('note', '')}")
    out.append(f"generator: {meta.get('generator', '?')}")
    out.append(f"load average at start {meta.get('loadavg_at_start')}, at end "
               f"{meta.get('loadavg_at_end')} (above the core count: other work shared the "
               "machine)")
    probe, prepared = meta.get("rate_probe") or {}, report.get("prepared") or {}
    if probe or prepared:
        needs = prepared.get("needs") or {}
        out.append(f"fixtures: rate probe (quart-trio ceiling, {probe.get('connections', '?')} "
                   f"connections) {_fmt(probe.get('rps'), '.0f')} req/s; database "
                   f"{prepared.get('unclaimed', '?')} unclaimed + {prepared.get('claimed', '?')}"
                   f" claimed tickets (the claims runs need {needs.get('fresh', '?')} fresh "
                   f"PIDs at that rate); {prepared.get('ingest_transfers', '?')} transfers a "
                   "catch-up")
    http = _measured(report, "http")
    if http:
        out.append("")
        out.append(f"HTTP over loopback ({http.get('duration_note', '')}; median of "
                   f"{http.get('repetitions', 1)}, of "
                   f"{http.get('repetitions_at_target_level', http.get('repetitions', 1))} at "
                   f"{TARGET_LEVEL}); ratios to the quart-trio ceiling at the "
                   "same connections")
        rows: list[list[str]] = []
        for scenario, label in SCENARIOS.items():
            for level, cell in sorted(http.get("scenarios", {}).get(scenario, {}).items(),
                                      key=lambda kv: int(kv[0])):
                rows.append([
                    label, level, _fmt(cell.get("rps"), ".0f"), _fmt(cell.get("p50_ms"), ".2f"),
                    _fmt(cell.get("p99_ms"), ".2f"), _fmt(cell.get("tail"), ".2f"),
                    _fmt(cell.get("ratio_to_quart"), ".2f"),
                    _fmt(cell.get("tail_to_quart"), ".2f"),
                    _fmt(cell.get("ratio_to_raw"), ".2f"),
                    _fmt(cell.get("server_cpu_us_per_req"), ".0f"),
                    _fmt(cell.get("cpu_ratio_to_quart"), ".2f"),
                    _fmt(cell.get("server_cpu_util"), ".2f"),
                    _fmt(cell.get("expected_pct"), ".1f"),
                ])
        out.extend(_table(["scenario", "conns", "req/s", "p50 ms", "p99 ms", "p99/p50",
                           "x quart", "tail x q", "x raw", "cpu us/req", "cpu x q", "util",
                           "ok %"], rows, "lrrrrrrrrrrrr"))
        out.append("(x quart: req/s ratio; tail x q: (p99/p50) ratio; cpu x q: the ceiling's CPU "
                   "per request / this one's; util: share of its core the server got)")
        batches = http.get("batch_sizes", {})
        if batches:
            out.append("")
            out.append("storage batch sizes under HTTP load (group commit, from /metrics)")
            brows = []
            for scenario, per_level in batches.items():
                for level, dist in sorted(per_level.items(), key=lambda kv: int(kv[0])):
                    buckets = " ".join(f"{k}:{v}" for k, v in dist.get("buckets", {}).items()
                                       if v)
                    brows.append([scenario, level, _fmt(dist.get("batches")),
                                  _fmt(dist.get("mean_batch"), ".2f"), buckets])
            out.extend(_table(["scenario", "conns", "batches", "mean", "distribution"],
                              brows, "lrrrl"))
    storage = _measured(report, "storage")
    if storage:
        out.append("")
        out.append(f"storage: fresh-PID redeems at {storage.get('connections')} connections on "
                   f"two servers ({storage.get('tickets')} tickets), "
                   f"{storage.get('repetitions')} runs each; the floor on a bare connection")
        out.append(f"  ({storage.get('rate_basis', '')})")
        srows = []
        for key, label in (("group_commit", "server, group commit (limit 256)"),
                           ("one_per_tx", "server, --batch-limit 1"),
                           ("raw_batched", "bare SQL, its mean batch a transaction"),
                           ("raw_one_per_tx", "bare SQL, one claim a transaction")):
            v = storage.get(key, {})
            srows.append([label, _fmt(v.get("claims_per_tx_s"), ".0f"),
                          _fmt(v.get("us_per_claim"), ".1f"), _fmt(v.get("mean_batch"), ".1f"),
                          _fmt(v.get("rps"), ".0f"), _fmt(v.get("server_cpu_us_per_req"), ".0f")])
        out.extend(_table(["variant", "claims/tx-s", "us/claim", "mean batch", "req/s",
                           "server cpu us/req"], srows, "lrrrrr"))
    ingest = _measured(report, "ingestion")
    if ingest:
        out.append("")
        out.append(f"ingestion: {_fmt(ingest.get('transfers_per_s'), '.0f')} transfers per "
                   f"server CPU second, {_fmt(ingest.get('transfers_per_wall_s'), '.0f')} per "
                   f"wall second ({ingest.get('transfers')} transfers in "
                   f"{ingest.get('messages')} transactions, {_fmt(ingest.get('seconds'), '.2f')}"
                   f" s; {ingest.get('path', '')})")
        out.append(f"  storage's transactions: {_fmt(ingest.get('storage_per_tx_s'), '.0f')} "
                   "per second of their time; the same statements on a bare connection: "
                   f"{_fmt(ingest.get('raw_sql_per_tx_s'), '.0f')} (ours "
                   f"{_fmt(ingest.get('vs_raw_sql'), '.2f')} x of it), "
                   f"{_fmt(ingest.get('raw_sql_per_cpu_s'), '.0f')} per CPU second")
        if ingest.get("scaled_to_reference_per_cpu_s"):
            scaled = _fmt(ingest.get("scaled_to_reference_per_cpu_s"), ".0f")
            out.append(f"  on a core as fast as the reference machine's (this run's ceiling "
                       f"{_fmt(ingest.get('ceiling_cpu_us_per_req'), '.0f')} CPU us a request "
                       f"vs {REFERENCE_CEILING_CPU_US:.0f}): {scaled} per CPU second")
        if ingest.get("server_gc_share") is not None:
            out.append(f"  the server's cyclic GC: {_fmt(ingest.get('server_gc_share'), '.1%')} "
                       "of the catch-up")
    mem = _measured(report, "memory_startup")
    if mem:
        out.append("")
        out.append(f"memory and start-up: {mem.get('recorded_pids')} recorded PIDs "
                   f"({mem.get('loaded_by', '')}), Bloom fp {mem.get('bloom_fp_rate')}")
        out.append(f"  ready {_fmt(mem.get('ready_s'), '.2f')} s (runs: "
                   f"{', '.join(_fmt(x, '.2f') for x in mem.get('ready_runs_s', []))}), "
                   f"Bloom prewarm {_fmt(mem.get('bloom_prewarm_s'), '.2f')} s; RSS "
                   f"{_fmt(mem.get('rss_mb'), '.1f')} MB, peak {_fmt(mem.get('peak_mb'), '.1f')} "
                   f"MB")
        if mem.get("load_seconds") is not None:
            out.append(f"  loading took {_fmt(mem.get('load_seconds'), '.1f')} s "
                       f"({_fmt(mem.get('load_rows_per_s'), '.0f')} rows/s)")
    ws = _measured(report, "websocket")
    if ws:
        out.append("")
        out.append(f"websocket: new claims at {ws.get('connections')} connections, "
                   f"{ws.get('runs_each')} runs each")
        wrows = []
        for label, key in (("no subscribers", "new_claims_no_subscribers"),
                           (f"{ws.get('idle_subscribers')} idle subscribers",
                            "new_claims_idle_subscribers")):
            c = ws.get(key, {})
            wrows.append([label, _fmt(c.get("rps"), ".0f"), _fmt(c.get("p50_ms"), ".2f"),
                          _fmt(c.get("p99_ms"), ".2f"),
                          _fmt(c.get("server_cpu_us_per_req"), ".0f"),
                          _fmt(c.get("server_gc_share"), ".1%")])
        out.extend(_table(["", "req/s", "p50 ms", "p99 ms", "cpu us/req", "in gc"], wrows,
                          "lrrrrr"))
        fan = ws.get("fanout") or {}
        if fan:
            f, r = fan.get("from_send_ms", {}), fan.get("from_response_ms", {})
            out.append(f"  fan-out, {fan.get('events')}/{fan.get('claims')} events: redeem sent "
                       f"-> event p50 {_fmt(f.get('p50'))} ms, p99 {_fmt(f.get('p99'))} ms; "
                       f"response -> event p50 {_fmt(r.get('p50'))} ms, p99 "
                       f"{_fmt(r.get('p99'))} ms")
        stuck = ws.get("stuck_watcher") or {}
        if stuck:
            r, k = stuck.get("new_claims_reading_watcher", {}), stuck.get(
                "new_claims_stuck_watcher", {})
            out.append(f"  a watcher that stopped reading ({stuck.get('top_ups_credited')} "
                       "top-ups of its ticket credited meanwhile, "
                       f"{stuck.get('slow_watchers_dropped')} watchers dropped as slow): "
                       f"{_fmt(k.get('rps'), '.0f')} "
                       f"req/s, {_fmt(k.get('server_cpu_us_per_req'), '.0f')} cpu us/req; one "
                       f"that reads: {_fmt(r.get('rps'), '.0f')} req/s, "
                       f"{_fmt(r.get('server_cpu_us_per_req'), '.0f')} cpu us/req (ratio "
                       f"{_fmt(stuck.get('ratio_stuck_to_reading'), '.2f')})")
            fates = [w for w in stuck.get("watchers", []) if w.get("mode") == "stuck"]
            if fates:
                out.append("  the stuck ones: " + "; ".join(
                    (f"dropped by the server (close code {w.get('close_code')})"
                     if w.get("closed_by_server") else "still open")
                    + f" after {w.get('held_s')} s" for w in fates))
        if ws.get("rss_per_watcher_kb") is not None:
            rounds = len(ws.get("rss_rounds", []))
            again = (f" ({_fmt(ws.get('rss_after_last_leave_mb'), '.1f')} MB after {rounds} "
                     "rounds)" if rounds > 1 else "")
            out.append(f"  server RSS {_fmt(ws.get('rss_before_mb'), '.1f')} MB, "
                       f"{_fmt(ws.get('rss_with_watchers_mb'), '.1f')} MB with the idle "
                       f"subscribers ({_fmt(ws.get('rss_per_watcher_kb'), '.1f')} KB each), "
                       f"{_fmt(ws.get('rss_after_leave_mb'), '.1f')} MB after they left{again}")
    skipped = [f"{name}: {report[name].get('status') or report[name].get('error')}"
               for name in SECTIONS if name in report and not _measured(report, name)]
    if skipped:
        out.append("")
        out.extend(skipped)
    prof = report.get("profile", {})
    pruns = {k: v for k, v in prof.get("runs", {}).items() if "self_by_layer_pct" in v}
    if pruns:
        out.append("")
        use_us = all("self_by_layer_us" in v for v in pruns.values())
        key = "self_by_layer_us" if use_us else "self_by_layer_pct"
        out.append(f"profile at {prof.get('connections')} connections (py-spy), self time by "
                   f"layer in {'CPU us per request' if use_us else '% of busy samples'}:")
        layers: list[str] = []
        for v in pruns.values():
            layers.extend(layer for layer in v[key] if layer not in layers)
        names = list(pruns)
        prow = [[layer, *(_fmt(pruns[n][key].get(layer, 0.0), ".0f" if use_us else ".1f")
                          for n in names)] for layer in layers]
        prow.append(["total (samples)", *(
            f"{_fmt(pruns[n].get('cpu_us_per_req'), '.0f')} ({pruns[n]['samples']})"
            if use_us else str(pruns[n]["samples"]) for n in names)])
        out.extend(_table(["layer", *names], prow, "l" + "r" * len(names)))
        out.append("inclusive (function anywhere on the stack), % of busy samples:")
        labels = list(next(iter(pruns.values()))["inclusive_pct"])
        irows = [[label, *(_fmt(pruns[n]["inclusive_pct"].get(label), ".1f") for n in names)]
                 for label in labels]
        out.extend(_table(["function", *names], irows, "l" + "r" * len(names)))
    out.append("")
    out.append("targets")
    trows = []
    for t in report.get("targets", []):
        mark = {True: "PASS", False: "FAIL", None: "n/a"}[t["pass"]]
        value = t["value"]
        vtext = _fmt(value, ".0f" if isinstance(value, float) and value >= 1000 else ".3f")
        trows.append([mark, t["id"], vtext, f"{t['op']} {t['threshold']:g} {t['unit']}".strip(),
                      t["what"]])
    out.extend(_table(["", "target", "value", "wanted", "what"], trows, "llrll"))
    short = report.get("short_runs", [])
    if short:
        out.append("")
        out.append(f"{len(short)} run{'s' if len(short) > 1 else ''} ran out of lines (each "
                   "sent once) and stopped early; rates are over the time they ran:")
        out.extend(f"  {r.get('run')}: {r.get('requests')} requests in {_fmt(r.get('ran_s'))} s "
                   f"of {_fmt(r.get('planned_s'))} s ({r.get('lines')} lines)" for r in short)
    s = report.get("summary", {})
    out.append(f"{s.get('passed', 0)} passed, {s.get('failed', 0)} failed"
               + (f", {s['not_measured']} not measured" if s.get("not_measured") else "")
               + (f", {s['short_runs']} short runs" if s.get("short_runs") else ""))
    if s.get("note"):
        out.append(s["note"])
    return "\n".join(out)

