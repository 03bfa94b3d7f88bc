"""The benchmark's machinery (`tests.bench`): parsers and report on canned data, then the
smallest real pieces (a short wrk run with the Lua script, the bare-SQL floors, a catch-up of
the real server from the fake wallet, the websocket load), and the whole `--quick` run as a
slow test."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import apsw
import pytest

from tests.bench import SECTIONS, data, floor, procs, profiling, report, runner, sizing, wrk

# What `wrk -s replay.lua` prints (the text part is wrk's own; the last line is the script's).
CANNED_WRK = """\
Running 2s test @ http://127.0.0.1:40123
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    37.65ms   10.12ms  98.40ms   78.00%
    Req/Sec     1.70k   120.00     1.90k    70.00%
  3400 requests in 2.00s, 612.30KB read
  Non-2xx or 3xx responses: 12
Requests/sec:   1699.50
Transfer/sec:    306.10KB
BENCH_JSON {"requests":3400,"duration_us":2000600,"latency_us":{"p50":35120.0,"p90":48000.5,\
"p99":74310.0,"mean":37650.2,"max":98400.0,"min":1200.0},"errors":{"connect":0,"read":0,\
"write":0,"status":12,"timeout":0},"counts":{"200:success":3388,"503":12},"wrapped":0}
"""

CANNED_METRICS = """\
# HELP anon_ticket_storage_batch_size Requests per group commit
# TYPE anon_ticket_storage_batch_size histogram
anon_ticket_storage_batch_size_bucket{le="1.0"} 10.0
anon_ticket_storage_batch_size_bucket{le="2.0"} 15.0
anon_ticket_storage_batch_size_bucket{le="4.0"} 18.0
anon_ticket_storage_batch_size_bucket{le="8.0"} 18.0
anon_ticket_storage_batch_size_bucket{le="+Inf"} 18.0
anon_ticket_storage_batch_size_count 18.0
anon_ticket_storage_batch_size_sum 30.0
anon_ticket_storage_batch_size_bucket{le="1.0",worker="1"} 0.0
anon_ticket_storage_batch_size_count{worker="1"} 0.0
anon_ticket_storage_batch_size_sum{worker="1"} 0.0
"""

CANNED_STACKS = """\
<module> (anon_ticket/__main__.py:1);run (trio/_core/_run.py:2424);\
handle_request (quart_trio/asgi.py:42);Public.create_app.<locals>.redeem (actors/public.py:120);\
Mailbox.ask (supervisors/mailbox.py:69) 3
<module> (anon_ticket/__main__.py:1);run (trio/_core/_run.py:2424);\
Storage._run_batch (actors/storage.py:184);Storage._claim (actors/storage.py:250);\
Storage._one (actors/storage.py:241) 5
<module> (anon_ticket/__main__.py:1);run (trio/_core/_run.py:2424);\
Connection._process_event (h11/_connection.py:272) 2
Thread._bootstrap (threading.py:988);WorkerThread._work (trio/_core/_thread_cache.py:209) 40
"""


def test_wrk_output_is_parsed() -> None:
    r = wrk.parse_wrk_output(CANNED_WRK)
    assert r.requests == 3400
    assert r.duration_s == pytest.approx(2.0006)
    assert r.rps == pytest.approx(3400 / 2.0006)
    assert r.p50_ms == pytest.approx(35.12) and r.p99_ms == pytest.approx(74.31)
    assert r.tail == pytest.approx(74.31 / 35.12)
    assert r.counts == {"200:success": 3388, "503": 12}
    assert r.count_of(("200:success",)) == 3388
    assert r.errors["status"] == 12 and r.socket_errors == 0
    with pytest.raises(wrk.WrkError):
        wrk.parse_wrk_output("Running 2s test\nRequests/sec: 10\n")


def test_a_run_that_ran_out_is_parsed_as_short() -> None:
    # 40 lines, each sent once: the one thread stopped 0.25 s into a 5 s run
    text = ('BENCH_JSON {"requests":38,"duration_us":5000100,"latency_us":{"p50":20.0,'
            '"p90":30.0,"p99":40.0,"mean":21.0,"max":45.0,"min":10.0},"errors":{"connect":0,'
            '"read":0,"write":0,"status":0,"timeout":0},"counts":{"200:success":38},'
            '"wrapped":0,"threads":[{"lines":40,"sent":40,"exhausted":1,"stopped_us":250000}]}')
    r = wrk.parse_wrk_output(text)
    assert r.exhausted and r.planned_s == pytest.approx(5.0001)
    assert r.duration_s == pytest.approx(0.25) and r.rps == pytest.approx(38 / 0.25)
    assert r.lines_sent == 40 and r.lines_by_thread == [40]
    assert not wrk.parse_wrk_output(CANNED_WRK).exhausted  # a timed run (an older script)
    # two threads: thread 0 had lines 0, 2, 4, 6 and sent three; thread 1 sent one of its own
    two = dataclasses.replace(r, sent_by_thread=[3, 1])
    assert wrk.split_sent(list("abcdefgh"), two) == (["a", "b", "c", "e"], ["d", "f", "g", "h"])
    pool = [b"y", b"z"]  # what a run does not send goes back to the head of its pool
    assert runner.Bench._give_back(pool, [b"a", b"b", b"c", b"d"], dataclasses.replace(
        r, sent_by_thread=[2])) == [b"a", b"b"]
    assert pool == [b"c", b"d", b"y", b"z"]


def test_every_fixture_is_sized_from_the_measured_rate() -> None:
    full, quick = runner.FULL, runner.QUICK
    # The day: the ceiling at 866 req/s; the database held 200,000 fresh PIDs.
    slow, fast = sizing.needs(full, 866.0, SECTIONS), sizing.needs(full, 1732.0, SECTIONS)
    assert slow.runs == {"http": 14 + 5, "websocket": 14, "storage": 3}  # + uncached runs
    per_run = sizing.per_run(866.0, 5, 64)
    assert per_run >= 866 * 5 * sizing.PER_RUN_MARGIN + 64  # a run's lines outlast it
    assert sizing.per_run(1732.0, 5, 64) - 65 == pytest.approx(2 * (per_run - 65), abs=1)
    assert fast.fresh - full.ws_fanout == pytest.approx(2 * (slow.fresh - full.ws_fanout),
                                                        rel=0.01)
    # the database: what the runs need at that rate, never less than the plan's own size
    assert slow.unclaimed == max(full.unclaimed, slow.fresh, slow.storage)
    assert fast.unclaimed == fast.fresh > full.unclaimed
    assert fast.claimed == full.tokens + fast.uncached > full.claimed
    # only what runs counts: no claims run, the plan's sizes; no rate, no run sized from it
    assert sizing.needs(full, 866.0, ("ingestion",)).unclaimed == full.unclaimed
    assert sizing.needs(quick, 866.0, ("websocket",)).runs == {"websocket": 4}
    assert sizing.needs(full, 866.0, ("http",), profile=True).runs == {"http": 19,
                                                                        "profile": 1}
    assert sizing.needs(quick, 866.0, ("http",)).uncached == 0  # quick skips that scenario
    # the catch-up: ingest_s seconds of the import's measured rate
    assert sizing.ingest_transfers(full, 15_000.0) == 105_000
    assert sizing.ingest_transfers(full, 30_000.0) == 210_000
    assert sizing.ingest_transfers(quick, 0.0) == sizing.MIN_INGEST_TRANSFERS


@pytest.mark.parametrize(("speed", "repeat_every"), [(1.0, 1_000), (1.4, 4), (1.0, 2)])
def test_the_fresh_pids_outlast_every_planned_run(speed: float, repeat_every: int) -> None:
    """Replay the full run's claims on the http and websocket server the way the runner
    takes them (each run's lines from the fastest rate seen at its level, the probe's before
    that; the unsent ones back): at `speed` x the probe's rate, every `repeat_every`-th run
    repeated, no run finds its pool short. Before, the lines came from constants and the
    websocket section found 390 fresh PIDs for 7,357 wanted (the ceiling at 866 req/s)."""
    plan, probe = runner.FULL, 866.0
    left = sizing.needs(plan, probe, SECTIONS).fresh - plan.ws_fanout
    seen: dict[int, float] = {}
    for i, run in enumerate(sizing.shared_server_runs(plan, SECTIONS, profile=False)):
        for _ in range(2 if i % repeat_every == repeat_every - 1 else 1):
            want = sizing.per_run(seen.get(run.connections) or probe, run.seconds,
                                  run.connections)
            assert want <= left, (i, run)
            rate = probe * speed
            left -= min(want, math.ceil(rate * run.seconds) + run.connections)  # sent
            seen[run.connections] = max(seen.get(run.connections, 0.0), rate)


def test_batch_histogram_is_read_from_metrics() -> None:
    # the process's own series (a server with worker processes adds theirs after it)
    before = procs.histogram(CANNED_METRICS, "anon_ticket_storage_batch_size")
    assert before["_count"] == 18 and before["_sum"] == 30 and before["2.0"] == 15
    zero = {k: 0.0 for k in before}
    dist = procs.bucket_distribution(procs.histogram_delta(zero, before))
    assert dist["batches"] == 18 and dist["requests"] == 30
    assert dist["mean_batch"] == pytest.approx(30 / 18, abs=0.01)
    assert dist["buckets"] == {"1": 10, "2": 5, "3-4": 3, "5-8": 0}


def test_a_runs_stall_events_are_read_from_the_servers_own_metrics() -> None:
    # The server's registry itself, so a renamed metric fails here and not silently in a run.
    from prometheus_client import generate_latest

    from anon_ticket.metrics import Metrics
    m = Metrics()
    before = generate_latest(m.registry).decode()
    m.gc_times.collections[2] += 1
    m.gc_times.seconds[2] += 0.25
    m.wal_checkpoints.labels("passive").inc(3)
    m.wal_checkpoints.labels("restart").inc()
    for seconds in (0.001, 0.02, 0.03, 0.3):
        m.commit_seconds.observe(seconds)
    after = generate_latest(m.registry).decode()
    assert runner._stall_events(before, after) == {
        "gc_full": 1, "gc_full_ms": 250, "checkpoint_passive": 3, "checkpoint_restart": 1,
        "slow_commits": 2}
    assert runner._stall_events(after, after) == {
        "gc_full": 0, "gc_full_ms": 0, "checkpoint_passive": 0, "checkpoint_restart": 0,
        "slow_commits": 0}
    work = runner._storage_work(before, after)  # what the storage section reads of a run
    assert work["transactions"] == 4 and work["seconds"] == pytest.approx(0.351)


def test_profile_summary_sorts_samples_into_layers() -> None:
    s = profiling.summarise(CANNED_STACKS)
    assert s["samples"] == 10 and s["idle_samples_left_out"] == 40
    assert s["self_by_layer_pct"]["storage actor + APSW (SQL)"] == 50.0
    assert s["self_by_layer_pct"]["mailbox hops (ask/reply)"] == 30.0
    assert s["self_by_layer_pct"]["h11 (HTTP parsing)"] == 20.0
    assert s["inclusive_pct"]["redeem handler (public.py: redeem)"] == 30.0
    assert s["inclusive_pct"]["storage claim handler (_claim)"] == 50.0


def _cell(rps: float, p50: float, p99: float) -> dict[str, float]:
    return {"rps": rps, "p50_ms": p50, "p99_ms": p99, "tail": p99 / p50}


def test_report_targets_table_and_json(tmp_path: Path) -> None:
    quart = _cell(1600, 36, 72)
    cells = {"quart_ceiling": quart, "new_claims": _cell(1400, 40, 90),
             "already_claimed": _cell(1500, 38, 76), "bloom_negative": _cell(1000, 50, 100),
             "invalid_pid": _cell(1550, 37, 74), "token": _cell(1450, 39, 80)}
    scenarios = {}
    for name, cell in cells.items():
        cell = dict(cell)
        cell["ratio_to_quart"] = cell["rps"] / quart["rps"]
        cell["tail_to_quart"] = cell["tail"] / quart["tail"]
        scenarios[name] = {"64": cell}
    rep = report.finish({
        "meta": {"mode": "quick"},
        "http": {"scenarios": scenarios, "repetitions": 1},
        "storage": {"group_commit_to_raw_batched": 0.8, "group_commit_to_one_per_tx": 3.0},
        "ingestion": {"transfers_per_s": 15_000.0, "transfers": 100},
        "memory_startup": {"rss_mb": 80.0, "ready_s": 4.0, "recorded_pids": 1_000_000},
        "websocket": {"idle_subscribers": 1000, "ratio_idle_to_none": 0.95,
                      "fanout": {"from_send_ms": {"p50": 4.0, "p99": 61.0}},
                      "stuck_watcher": {"ratio_stuck_to_reading": 0.97}},
    })
    verdict = {t["id"]: t["pass"] for t in rep["targets"]}
    assert verdict["throughput.new_claims"] is True  # 0.875
    assert verdict["throughput.bloom_negative"] is False  # 0.625
    assert verdict["tail.new_claims"] is True  # 2.25 / 2.0 = 1.125
    assert verdict["tail.token"] is True
    assert verdict["storage.vs_raw_batched"] is True
    assert verdict["ingestion.rate"] is False
    assert verdict["startup.rss"] is True and verdict["startup.ready"] is True
    assert verdict["websocket.idle_cost"] is True
    assert verdict["websocket.stuck_cost"] is True
    assert verdict["websocket.fanout_p99"] is False  # 61 ms > 50
    assert rep["summary"]["failed_ids"] == ["throughput.bloom_negative", "ingestion.rate",
                                            "websocket.fanout_p99"]
    text = report.render(rep)
    assert "redeem: new claim (fresh PID)" in text
    assert "FAIL  throughput.bloom_negative" in text
    assert "FAIL  websocket.fanout_p99" in text
    assert report.QUICK_NOTE in text  # a quick run says it is a smoke test
    assert report.QUICK_NOTE not in report.render(report.finish({"meta": {"mode": "full"}}))
    out = tmp_path / "r" / "report.json"
    report.write_json(rep, out)
    assert json.loads(out.read_text())["summary"]["failed"] == 3


def test_missing_sections_are_not_measured() -> None:
    rep = report.finish({"websocket": {"status": "not run (--only)"},
                         "storage": {"error": "RuntimeError: boom"}})
    assert all(t["pass"] is None for t in rep["targets"])
    assert rep["summary"]["not_measured"] == len(rep["targets"])
    text = report.render(rep)  # no KeyError on an empty report
    assert "websocket: not run (--only)" in text and "storage: RuntimeError: boom" in text


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_wrk_drives_the_raw_asgi_ceiling(tmp_path: Path) -> None:
    """The Lua script against a real server: every request answered and classified. The
    ceilings start side by side unpinned and are pinned, every thread, once ready."""
    core = {min(os.sched_getaffinity(0))}
    child = procs.spawn_ceiling("raw", cpus=None, log_path=tmp_path / "raw.log")
    other = procs.spawn_ceiling("quart", cpus=None, log_path=tmp_path / "quart.log")
    try:
        procs.ready([child, other], cpus=core)
        for c in (child, other):
            assert c.ready_s is not None
            tids = os.listdir(f"/proc/{c.proc.pid}/task")
            assert all(os.sched_getaffinity(int(t)) == core for t in tids)
        script = wrk.write_script(tmp_path)
        lines = wrk.write_lines(tmp_path / "bodies.txt",
                                [json.dumps({"pid": f"{i:016x}"}) for i in range(1, 50)])
        r = wrk.run_wrk(child.url, script=script, method="POST", path="/echo",
                        lines_file=lines, connections=4, duration_s=1)
        cpu = procs.cpu_seconds(child.proc.pid)
    finally:
        child.stop()
        other.stop()
    assert r.requests > 50
    assert r.counts.get("200", 0) >= r.requests - 4  # the last few may be cut at the end
    assert r.socket_errors == 0
    assert r.wrapped >= 1  # 49 lines, cycled
    assert r.generator_cpu is not None and cpu > 0


class _FirstRequests(BaseHTTPRequestHandler):
    """Keep-alive HTTP that notes, per connection, how long after the accept its first
    request came."""

    protocol_version = "HTTP/1.1"
    waits: ClassVar[list[float]] = []  # a subclass per server gets its own

    def setup(self) -> None:
        super().setup()
        self.accepted, self.first = time.monotonic(), True

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        if self.first:
            self.first = False
            self.waits.append(time.monotonic() - self.accepted)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def _first_request_server() -> Iterator[tuple[str, list[float]]]:
    waits: list[float] = []
    handler = type("Handler", (_FirstRequests,), {"waits": waits})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", waits
    finally:
        server.shutdown()
        server.server_close()


class _Recording(BaseHTTPRequestHandler):
    """Keep-alive HTTP that notes every request body it gets."""

    protocol_version = "HTTP/1.1"
    bodies: ClassVar[list[str]] = []  # a subclass per server gets its own

    def do_POST(self) -> None:
        self.bodies.append(self.rfile.read(int(self.headers["Content-Length"])).decode())
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def _recording_server() -> Iterator[tuple[str, list[str]]]:
    bodies: list[str] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0),
                                 type("Handler", (_Recording,), {"bodies": bodies}))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", bodies
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_wrk_stops_cleanly_when_its_lines_run_out(tmp_path: Path) -> None:
    """Lines sent once (fresh PIDs): a run with too few ends early, cleanly, says so and
    when, and sent every line exactly once; one with none at all (wrk exited 1 on it,
    "incomplete request at 1:1") sends nothing; one with more than it needs says which it
    did not send."""
    script = wrk.write_script(tmp_path)
    few = [json.dumps({"pid": f"{i:016x}"}) for i in range(1, 41)]
    many = [json.dumps({"pid": f"{i:016x}"}) for i in range(1, 200_001)]
    with _recording_server() as (url, bodies):
        def run(name: str, lines: list[str]) -> wrk.WrkResult:
            return wrk.run_wrk(url, script=script, method="POST", path="/", connections=4,
                               lines_file=wrk.write_lines(tmp_path / name, lines),
                               duration_s=2, once=True)

        short = run("few.txt", few)
        time.sleep(0.2)  # the server answers what was in flight when wrk stopped
        got_few = list(bodies)
        bodies.clear()
        none = run("none.txt", [])
        got_none = list(bodies)
        long = run("many.txt", many)
        time.sleep(0.2)
        got_many = list(bodies)
    assert short.exhausted and short.planned_s == pytest.approx(2.0, abs=0.1)
    assert 0 < short.duration_s < 1.5 and short.rps == short.requests / short.duration_s
    assert len(few) - 4 <= short.requests <= len(few)  # at most 4 in flight, not waited for
    assert short.count_of(("200",)) == short.requests and short.socket_errors == 0
    assert sorted(got_few) == sorted(few)  # each once: the check call sent nothing
    assert wrk.split_sent(few, short) == (few, [])
    assert none.exhausted and none.requests == 0 and got_none == []
    # (wrk's own clock on a loaded machine: a run of -d 2 measured 2.10 s once)
    assert not long.exhausted and long.duration_s == pytest.approx(2.0, abs=0.5)
    sent, unsent = wrk.split_sent(many, long)
    assert len(sent) == long.lines_sent >= long.requests > 0 and unsent == many[len(sent):]
    assert sorted(got_many) == sorted(sent)


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_a_run_that_runs_out_is_reported_as_short(tmp_path: Path) -> None:
    """The runner's side: a claims run handed too few PIDs ends, is counted in its cell and
    listed in the report (`short_runs`, the summary, the table), and its unsent lines (none
    here) go back to the pool."""
    said: list[str] = []
    (tmp_path / "work").mkdir()
    bench = runner.Bench(runner.QUICK, tmp_path / "work", said.append, None)
    child = procs.spawn_ceiling("raw", cpus=None, log_path=tmp_path / "raw.log")
    pool = [data.random_pid() for _ in range(30)]
    try:
        procs.ready([child], cpus=None)
        take = bench._take(pool, 100, "fresh PIDs")
        lines = bench._file([runner._body(b) for b in take])
        result, cpu = bench._drive(child, "POST", "/echo", lines, 4, 2, once=True,
                                   label="http new_claims c=4 rep 1")
    finally:
        child.stop()
    assert len(take) == 30 and pool == [] and "only 30 fresh PIDs left for 100" in said[0]
    assert bench._give_back(pool, take, result) == take and pool == []
    assert result.exhausted and result.requests <= 30
    [short] = bench.short_runs
    assert short["run"] == "http new_claims c=4 rep 1" and short["lines"] == 30
    assert short["ran_s"] < short["planned_s"] and short["requests"] == result.requests
    assert runner.Cell([result], [cpu]).summary(("200",))["short_runs"] == 1
    rep = report.finish({"meta": {"mode": "full"}, "short_runs": bench.short_runs})
    assert rep["summary"]["short_runs"] == 1
    text = report.render(rep)
    assert "1 run ran out of lines" in text and "http new_claims c=4 rep 1" in text


def test_wrk_spreads_the_first_requests_of_its_connections(tmp_path: Path) -> None:
    # wrk opens every connection at once; the script holds each first request back a random
    # 0..stagger ms, so a run does not start with a burst that its p99 would be made of.
    script = wrk.write_script(tmp_path)
    lines = wrk.write_lines(tmp_path / "bodies.txt", ['{"pid":"0123456789abcdef"}'])
    with _first_request_server() as (url, waits):
        r = wrk.run_wrk(url, script=script, method="POST", path="/", lines_file=lines,
                        connections=8, duration_s=2, stagger_ms=1000)
    assert r.requests > 8 and len(waits) == 8
    # Eight draws from 0..1000 ms: all within 250 ms of each other has odds of about 1e-4.
    assert max(waits) - min(waits) > 0.25
    # Held back at most `stagger_ms`, not per connection (8 s): room for a shared machine's
    # pauses, which only ever lengthen a wait.
    assert max(waits) < 3.0
    assert wrk.stagger_for(64) == 256 and wrk.stagger_for(256) == wrk.MAX_STAGGER_MS


def test_the_floors_run_storages_statements(tmp_path: Path) -> None:
    """The bare-SQL floors on a database loaded through `db import-legacy`: claims (then the
    same again, all already claimed) and credited transfers, each group a transaction."""
    legacy = data.write_legacy(tmp_path / "legacy.db", 300, 20)
    imported = data.import_legacy(tmp_path / "base", legacy)
    assert "tickets created:           320" in imported.output
    pids = [row[0] for row in legacy.unclaimed[:200]]
    db = data.copy_data_dir(tmp_path / "base", tmp_path / "claims") / "anon-ticket.db"
    run = floor.claims(db, pids, per_tx=64)
    assert run.outcomes == {"success": 200} and run.transactions == 4
    assert run.per_tx_s > 0 and run.per_cpu_s > 0
    assert floor.claims(db, pids, per_tx=64).outcomes == {"not_claimable": 200}
    conn = apsw.Connection(str(db))
    try:
        pid, tx = pids[0], legacy.unclaimed[0][1]
        token = conn.execute("SELECT token FROM tickets WHERE pid = ?", (pid,)).fetchall()
        assert token == [(floor.token_for(pid, bytes.fromhex(tx)),)]  # the claim's own token
    finally:
        conn.close()

    db = data.copy_data_dir(tmp_path / "base", tmp_path / "ingest") / "anon-ticket.db"
    transfers = [(os.urandom(32), data.random_pid(), 10**12, 50_000 + i // 10)
                 for i in range(600)]
    assert [len(g) for g in floor.blocks(transfers, 256)] == [260, 260, 80]  # whole blocks
    run = floor.ingest(db, transfers, per_tx=256)
    assert run.outcomes == {"credited": 600} and run.transactions == 3
    conn = apsw.Connection(str(db))
    try:
        assert conn.execute("SELECT count(*) FROM tickets").fetchall() == [(920,)]
        assert conn.execute("SELECT value FROM state WHERE key = 'cursor'").fetchall() == [
            (50_059,)]
    finally:
        conn.close()


def test_the_floors_statements_are_storages(tmp_path: Path) -> None:
    """The floors copy the storage actor's statements and connection settings until storage
    offers them publicly: a change there must fail here, not leave the floor measuring other
    SQL."""
    from actors import storage
    from anon_ticket.schema import migrate

    assert {name: getattr(storage, name) for name in floor.STATEMENTS} == floor.STATEMENTS
    db = tmp_path / "anon-ticket.db"
    migrate(db)
    settings = ("journal_mode", "synchronous", "journal_size_limit", "foreign_keys",
                "cache_size")
    theirs, ours = storage.open_connection(db), floor.open_connection(db)
    try:
        for name in settings:
            assert (ours.execute(f"PRAGMA {name}").fetchall()
                    == theirs.execute(f"PRAGMA {name}").fetchall()), name
    finally:
        ours.close()
        theirs.close()


def test_a_catch_up_of_the_real_server_from_the_fake_wallet(tmp_path: Path) -> None:
    """The ingestion section's path on a small scale: the server polls the fake wallet, is
    paused, the wallet shows 600 new payments at once, and the resumed catch-up credits them
    all; /metrics says how many transactions storage used and how long they took."""
    legacy = data.write_legacy(tmp_path / "legacy.db", 50, 0)
    data.import_legacy(tmp_path / "base", legacy)
    (tmp_path / "work").mkdir()
    bench = runner.Bench(runner.QUICK, tmp_path / "work", lambda text: None, None)
    bench.wallet_height = max(row[3] for row in legacy.unclaimed) + 100
    run, transfers = bench._catch_up(tmp_path / "base", 0, 600)
    assert len(transfers) == run["transfers"] == 600
    assert run["credited"] == 600
    assert 1 <= run["transactions"] <= 10 and run["per_tx_s"] > 0 and run["per_cpu_s"] > 0


def test_bulk_load_writes_recorded_tickets(tmp_path: Path) -> None:
    db = tmp_path / "big.db"
    data.bulk_load(db, 1000)
    conn = apsw.Connection(str(db))
    try:
        pids = [bytes(r[0]) for r in conn.execute("SELECT pid FROM tickets ORDER BY pid")]
        assert len(set(pids)) == 1000 and bytes(8) not in pids
        assert all(len(p) == 8 for p in pids)
        rows = [(int(a), int(s), int(n), int(h)) for a, s, n, h in conn.execute(
            "SELECT t.amount, sum(x.amount), count(*), min(x.height) "
            "FROM tickets t JOIN transfers x USING (pid) GROUP BY pid ORDER BY pid")]
        assert len(rows) == 1000
        assert all(a == s == data.AMOUNT and n == 1 for a, s, n, _ in rows)
        heights = [h for *_, h in rows]
        assert heights == sorted(heights) and heights[0] == data.FIRST_HEIGHT
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("PRAGMA journal_mode").fetchall() == [("wal",)]
    finally:
        conn.close()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_quick_bench_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "tests.bench", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    rep = json.loads(out.read_text())
    for section in ("http", "storage", "ingestion", "memory_startup", "websocket", "targets"):
        assert section in rep and "error" not in rep[section], section
    assert rep["websocket"]["fanout"]["events"] == rep["websocket"]["fanout"]["claims"]
    assert rep["websocket"]["stuck_watcher"]["top_ups_credited"] > 0
    assert rep["meta"]["duration_s"] < 75  # about a minute
    assert "targets" in done.stdout


def test_websocket_load_holds_idle_subscribers_and_times_the_claimed_event(
        tmp_path: Path) -> None:
    """The websocket section's load process against the real server: idle watchers stay
    connected and get nothing; each fan-out claim's `claimed` event arrives and is timed; a
    watcher that never reads and one that reads are opened and closed on command."""
    legacy = data.write_legacy(tmp_path / "legacy.db", 30, 0)
    data.import_legacy(tmp_path / "d", legacy)
    server = procs.spawn_server(tmp_path / "d", cpus=None, log_dir=tmp_path,
                                bloom_entries=1000)
    try:
        server.wait_ready()
        fan = tmp_path / "fan.txt"
        fan.write_text("".join(f"{row[0].hex()}\n" for row in legacy.unclaimed[:5]))
        load = procs.start_watchload(server.url, 40, fan, cpus=None)
        assert load.ready["idle"] == 40
        result = load.command("fanout", "fanout", timeout=60)
        pid = legacy.unclaimed[6][0].hex()
        assert load.command(f"watch stuck {pid}", "watching") == "stuck"
        stuck = load.command("unwatch", "unwatched")
        assert load.command(f"watch reading {pid}", "watching") == "reading"
        reading = load.command("unwatch", "unwatched")
        end = load.quit_load()
    finally:
        server.stop()
    assert result["claims"] == result["events"] == 5
    assert result["statuses"] == {"200:success": 5}
    sent, answered = result["from_send_ms"], result["from_response_ms"]
    assert 0 < sent["p50"] <= sent["p99"] <= sent["max"] < 5000
    assert answered["p99"] <= sent["p99"]  # the response comes after the request was sent
    assert end == {"idle_closed_by_server": 0, "messages_to_idle": 0}
    # the stuck one's state was waiting for it, unread; the reading one read its own
    assert (stuck["mode"], stuck["closed_by_server"], stuck["messages_left_unread"]) == (
        "stuck", False, 1)
    assert (reading["mode"], reading["closed_by_server"], reading["messages"]) == (
        "reading", False, 0)


def test_each_scenario_is_paired_with_the_ceiling_runs_around_it() -> None:
    from tests.bench.runner import Cell, _pair_with_ceiling

    def run(rps: float) -> wrk.WrkResult:  # 2 s runs; the server's CPU: 1 ms a request
        return wrk.WrkResult(int(rps * 2), 2.0, 10, 20, 30, 12, 40, {"200": int(rps * 2)}, {})

    sequence = [("quart_ceiling", run(100), 0.2), ("a", run(50), 0.1), ("b", run(60), 0.12),
                ("quart_ceiling", run(200), 0.4), ("c", run(180), 0.36)]
    cells = {name: Cell([r], [cpu]) for name, r, cpu in sequence}
    _pair_with_ceiling(sequence, cells)
    assert cells["a"].paired_rps == cells["b"].paired_rps == [150.0]  # between 100 and 200
    assert cells["c"].paired_rps == [200.0]  # only one ceiling run after it: the one before
    assert cells["quart_ceiling"].paired_rps == []
    summary = cells["a"].summary(("200",))
    assert summary["paired_ratio_to_quart"] == round(50 / 150, 3)
    assert summary["paired_cpu_ratio_to_quart"] == 1.0  # the same CPU per request as it


def test_idle_runs_are_compared_with_the_run_beside_them() -> None:
    # A slow stretch of a shared machine hits one pair, not the median of one side.
    idle, none = [450.0, 300.0, 640.0], [600.0, 310.0, 650.0]  # medians: 450 / 600 = 0.75
    assert runner.median_ratio(idle, none) == pytest.approx(300 / 310, abs=0.002)
    assert runner.median_ratio([0.0, 1.0, None], [2.0, 0.0, 1.0]) == 0.0  # a dead run counts
    assert runner.median_ratio([], none) is None
