"""The PostgreSQL-against-SQLite and nodes benchmark's helpers (`tests.bench.nodes`): the
PostgreSQL server's CPU from /proc text, the order of runs, the lines each wrk process
sends, the ratios and their summary, and the prepared data (the same rows in SQLite and in a
real PostgreSQL database). No anon-ticket server runs here."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

import psycopg
import pytest

from actors.storage import CLAIM_READ
from anon_ticket import schema
from tests.bench import data, nodes
from tests.bench.nodes import (
    PG,
    PG_SYNC_OFF,
    SQLITE,
    TWO_NODES,
    DbCpu,
    Run,
    already_lines,
    parse_stat,
    pg_cpu_delta,
    pg_role,
    pg_tree_reading,
    ratios_against,
    run_order,
    split_lines,
    ticket_rows,
    tree_members,
    write_postgres,
    write_sqlite,
)
from tests.bench.workers import CLK_TCK, CpuDelta
from tests.bench.wrk import WrkResult


def stat_line(pid: int, comm: str, ppid: int, utime: int, stime: int, cutime: int = 0,
              cstime: int = 0) -> str:
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
    # utime stime cutime cstime ...
    return (f"{pid} ({comm}) S {ppid} {pid} {pid} 0 -1 4194560 100 0 0 0 {utime} {stime} "
            f"{cutime} {cstime} 20 0 1 0 12345 1000000 500\n")


T = CLK_TCK


# --- /proc -----------------------------------------------------------------------------------


def test_parse_stat_reads_ppid_own_and_reaped_time() -> None:
    assert parse_stat(stat_line(7, "postgres", 1, 3 * T, T, 2 * T, T)) == pytest.approx(
        (1, 4.0, 3.0))
    # a command name with spaces and parentheses does not shift the fields
    assert parse_stat(stat_line(8, "a) b (c", 7, T // 2, T // 2)) == pytest.approx(
        (7, 1.0, 0.0))


def test_parse_stat_reads_this_process() -> None:
    with open(f"/proc/{os.getpid()}/stat") as f:
        ppid, own, _ = parse_stat(f.read())
    assert ppid == os.getppid() and own > 0


@pytest.mark.parametrize(("title", "role"), [
    ("postgres: anon bench_pg [local] idle", ("backend", "bench_pg")),
    ("postgres: anon bench_pg [local] UPDATE\0\0\0\0", ("backend", "bench_pg")),
    ("postgres: app shop 10.0.0.7(51234) idle in transaction", ("backend", "shop")),
    ("postgres: walwriter   ", ("walwriter", None)),
    ("postgres: checkpointer", ("checkpointer", None)),
    ("postgres: background writer", ("background writer", None)),
    ("postgres: autovacuum launcher", ("autovacuum launcher", None)),
    ("postgres: logical replication launcher", ("logical replication launcher", None)),
    ("postgres: autovacuum worker bench_pg", ("autovacuum worker", "bench_pg")),
    ("postgres: autovacuum worker", ("autovacuum worker", None)),
    ("postgres: parallel worker for PID 4242", ("parallel worker", None)),
    ("/usr/lib/postgresql/15/bin/postgres\0-D\0/tmp/x/data\0", ("other", None)),
    ("", ("other", None)),
])
def test_pg_role_from_the_process_title(title: str, role: tuple[str, str | None]) -> None:
    assert pg_role(title) == role


def test_tree_members_are_the_root_and_everything_under_it() -> None:
    parents = {1: 0, 100: 1, 101: 100, 102: 100, 103: 102, 200: 1, 201: 200}
    assert tree_members(parents, 100) == [100, 101, 102, 103]
    assert tree_members(parents, 103) == [103]
    assert tree_members(parents, 999) == []  # not running


# The postmaster (500, started by pg_ctl, so its parent is init), its server-wide processes,
# a backend of the run's database, one of another database (an idle node), and an unrelated
# process.
def proc_text(postmaster_cutime: int = 0, backend: int = 0, other_backend: int = 0,
              walwriter: int = 0, extra: dict[int, str] | None = None) -> dict[int, str]:
    stats = {
        1: stat_line(1, "init", 0, 50 * T, 50 * T),
        500: stat_line(500, "postgres", 1, T, 0, postmaster_cutime, 0),
        501: stat_line(501, "postgres", 500, T // 10, 0),
        502: stat_line(502, "postgres", 500, walwriter, 0),
        510: stat_line(510, "postgres", 500, backend, 0),
        520: stat_line(520, "postgres", 500, other_backend, 0),
        900: stat_line(900, "python", 1, 99 * T, 0),
    }
    stats.update(extra or {})
    return stats


TITLES = {500: "/usr/lib/postgresql/15/bin/postgres\0-D\0/x", 501: "postgres: checkpointer",
          502: "postgres: walwriter", 510: "postgres: anon bench_pg [local] idle",
          520: "postgres: anon bench_pg_two [local] idle", 530: "postgres: anon bench_pg x"}


def test_pg_tree_reading_counts_each_process_with_the_children_it_reaped() -> None:
    reading = pg_tree_reading(proc_text(postmaster_cutime=3 * T, backend=2 * T), TITLES, 500)
    assert sorted(reading) == [500, 501, 502, 510, 520]  # not init, not the python process
    assert (reading[500].ppid, reading[500].role, reading[500].database) == (
        1, "postmaster", None)
    assert reading[500].cpu_s == pytest.approx(1.0 + 3.0)  # its own and its reaped children's
    assert reading[510].role == "backend" and reading[510].database == "bench_pg"
    assert reading[510].cpu_s == pytest.approx(2.0)
    assert reading[520].database == "bench_pg_two"
    assert reading[502].role == "walwriter" and reading[502].database is None
    assert pg_tree_reading(proc_text(), TITLES, 777) == {}  # the server is not running


def test_pg_cpu_delta_splits_the_runs_database_from_shared_and_others() -> None:
    before = pg_tree_reading(proc_text(backend=T, other_backend=T, walwriter=T), TITLES, 500)
    after = pg_tree_reading(proc_text(backend=4 * T, other_backend=T + T // 5,
                                      walwriter=T + T // 2), TITLES, 500)
    d = pg_cpu_delta(before, after, 500, "bench_pg")
    assert d.database_s == pytest.approx(3.0)
    assert d.shared_s == pytest.approx(0.5)  # the walwriter; postmaster, checkpointer idle
    assert d.others_s == pytest.approx(0.2)  # the idle node's backend
    assert d.total_s == pytest.approx(3.7)
    assert d.attributed_s == pytest.approx(3.5)
    assert d.by_role["backend"] == pytest.approx(3.2) and d.ended == 0
    # an SQLite run: no database of this server is the run's, only the shared part counts
    sqlite_run = pg_cpu_delta(before, after, 500, None)
    assert sqlite_run.database_s == 0.0 and sqlite_run.others_s == pytest.approx(3.2)


def test_pg_cpu_delta_counts_an_ended_backend_under_its_parent_and_a_new_one_from_zero() -> None:
    before = pg_tree_reading(proc_text(backend=2 * T), TITLES, 500)
    # backend 510 ended after using 2.5 s in all (0.5 s in the run): the postmaster reaped it,
    # so its 2.5 s are now in the postmaster's reaped time; backend 530 started and used 1 s
    gone = {pid: text for pid, text in proc_text(postmaster_cutime=T * 5 // 2).items()
            if pid != 510}
    gone[530] = stat_line(530, "postgres", 500, T, 0)
    after = pg_tree_reading(gone, TITLES, 500)
    d = pg_cpu_delta(before, after, 500, "bench_pg")
    assert d.total_s == pytest.approx(0.5 + 1.0)
    assert d.ended == 1
    assert d.by_role["postmaster"] == pytest.approx(0.5)  # the ended backend's run time
    assert d.database_s == pytest.approx(1.0)  # the new backend (a shared cost: 0.5)
    assert d.shared_s == pytest.approx(0.5)
    assert d.as_dict()["ended"] == 1


def test_read_pg_tree_reads_a_live_tree() -> None:
    reading = nodes.read_pg_tree(os.getpid())  # this process stands in for a postmaster
    assert reading[os.getpid()].role == "postmaster" and reading[os.getpid()].cpu_s > 0


# --- orders, lines, ratios ------------------------------------------------------------------


def test_run_order_of_three_swaps_the_first_two_and_puts_each_first_equally() -> None:
    configs = (SQLITE, PG, PG_SYNC_OFF)
    orders = [run_order(configs, rep, 0) for rep in range(6)]
    assert len(set(orders)) == 6  # every order once
    for order in orders:
        assert sorted(order) == sorted(configs)
    ahead = [o.index(SQLITE) < o.index(PG) for o in orders]
    assert ahead == [True, False, True, False, True, False]
    firsts = [o[0] for o in orders]
    assert all(firsts.count(c) == 2 for c in configs)
    # the next scenario of a repetition takes the other side of the swap
    assert run_order(configs, 0, 1) == run_order(configs, 1, 0)


def test_run_order_of_two_swaps_every_time() -> None:
    assert run_order((PG, TWO_NODES), 0, 0) == (PG, TWO_NODES)
    assert run_order((PG, TWO_NODES), 0, 1) == (TWO_NODES, PG)
    assert run_order((PG, TWO_NODES), 1, 0) == (TWO_NODES, PG)
    assert run_order((PG, TWO_NODES), 1, 1) == (PG, TWO_NODES)


def test_split_lines_deals_round_robin() -> None:
    ids = [bytes([i]) for i in range(7)]
    assert split_lines(ids, 2) == [ids[0::2], ids[1::2]]
    assert split_lines(ids, 1) == [ids]


def test_already_lines_ask_each_node_for_what_the_other_claimed() -> None:
    a, b = [b"a1", b"a2"], [b"b1", b"b2", b"b3"]
    assert already_lines([a, b], 2) == [b, a]  # wrk 0 on node a gets b's claims, and back
    # one node, two wrk processes: its own claims, dealt between them
    assert already_lines([a + b], 2) == [[b"a1", b"b1", b"b3"], [b"a2", b"b2"]]
    assert already_lines([a], 1) == [a]


def test_ratios_against_the_base_repetition_by_repetition() -> None:
    ratios = ratios_against({SQLITE: [100.0, 200.0, 50.0], PG: [80.0, 100.0, None],
                             PG_SYNC_OFF: [120.0, 300.0, 75.0]}, SQLITE)
    assert set(ratios) == {f"{PG}/{SQLITE}", f"{PG_SYNC_OFF}/{SQLITE}"}
    assert ratios[f"{PG}/{SQLITE}"] == {"median": 0.65, "min": 0.5, "max": 0.8,
                                        "runs": [0.8, 0.5]}  # the third is left out
    assert ratios[f"{PG_SYNC_OFF}/{SQLITE}"]["median"] == 1.5
    assert ratios_against({SQLITE: [], PG: []}, SQLITE)[f"{PG}/{SQLITE}"]["median"] is None


def wrk_result(counts: dict[str, int], duration_s: float = 2.0) -> WrkResult:
    return WrkResult(requests=sum(counts.values()), duration_s=duration_s, p50_ms=5.0,
                     p90_ms=8.0, p99_ms=12.0, mean_ms=6.0, max_ms=20.0, counts=counts,
                     errors={}, generator_cpu=0.1)


def fake_run(config: str, rep: int, claims: int, server_s: float, db_s: float, *,
             phase: str = nodes.PHASE1, scenario: str = "new_claims",
             other_s: float = 0.0) -> Run:
    key = nodes.EXPECTED[scenario][0]
    database = nodes.DATABASES.get(config)
    db = DbCpu(db_s + 0.3, db_s, 0.0, 0.3, {"backend": db_s + 0.3})
    run = Run(phase, rep, scenario, config, 0, database, [wrk_result({key: claims})], [64],
              [CpuDelta(server_s, {1: server_s})], [1], db, 2.5)
    run.other_cpu_s = other_s
    return run


def test_run_counts_postgres_cpu_for_its_database_only() -> None:
    pg = fake_run(PG, 0, 2000, server_s=1.5, db_s=0.5)
    assert pg.claims_per_s == 1000.0
    assert pg.claims_per_cpu_s == pytest.approx(1000.0)  # 2000 / (1.5 + 0.5)
    assert pg.claims_per_server_cpu_s == pytest.approx(2000 / 1.5)
    sqlite = fake_run(SQLITE, 0, 2000, server_s=1.5, db_s=0.5)  # PostgreSQL's CPU is not its
    assert sqlite.db_cpu_s == 0.0 and sqlite.claims_per_cpu_s == pytest.approx(2000 / 1.5)
    d = pg.as_dict()
    assert d["claims"] == 2000 and d["db_cpu_s"] == 0.5 and d["cpu_us_per_claim"] == 1000.0
    assert d["expected_pct"] == 100.0
    # two wrk processes: all claims over the longer one's duration
    two = fake_run(TWO_NODES, 0, 0, server_s=1.0, db_s=0.0)
    two.results = [wrk_result({"200:success": 1000}, 2.0),
                   wrk_result({"200:success": 900, "503": 100}, 1.8)]
    assert two.claims == 1900 and two.claims_per_s == 950.0 and two.answers == 2000


def test_phase_summary_and_the_two_nodes_verdict() -> None:
    runs: list[Run] = []
    for rep, (s, p, q) in enumerate([(2000, 1500, 2200), (1800, 1600, 2000)]):
        for scenario in nodes.SCENARIOS:
            runs += [fake_run(SQLITE, rep, s, 2.0, 0.0, scenario=scenario),
                     fake_run(PG, rep, p, 2.0, 0.5, scenario=scenario,
                              other_s=2.0 if rep == 1 else 0.0),
                     fake_run(PG_SYNC_OFF, rep, q, 2.0, 0.5, scenario=scenario)]
    summary = nodes.phase_summary(runs, nodes.PHASE1, nodes.PHASE1_CONFIGS)
    cell = summary["new_claims"]
    assert cell[SQLITE]["claims_per_s"]["runs"] == [1000.0, 900.0]
    assert cell["ratios"]["claims_per_s"][f"{PG}/{SQLITE}"]["runs"] == pytest.approx(
        [0.75, 0.889])
    # per (server + database) CPU second: 1500 / 2.5 over 2000 / 2.0
    assert cell["ratios"]["claims_per_cpu_s"][f"{PG}/{SQLITE}"]["runs"][0] == 0.6
    assert cell["ratios"]["claims_per_server_cpu_s"][f"{PG}/{SQLITE}"]["runs"][0] == 0.75
    # the second repetition saw a core of other load: the quiet ratios leave it out
    assert cell["noise_by_rep"] == [0.0, 1.0]
    assert cell["quiet_ratios"]["reps"] == 1
    assert cell["quiet_ratios"]["claims_per_s"][f"{PG}/{SQLITE}"]["runs"] == [0.75]

    two = [fake_run(c, 0, n, 2.0, 0.4, phase=nodes.PHASE2, scenario=sc)
           for c, n in ((PG, 1000), (TWO_NODES, 1700)) for sc in nodes.SCENARIOS]
    s2 = nodes.phase_summary(two, nodes.PHASE2, nodes.PHASE2_CONFIGS)
    verdict = nodes.two_nodes_verdict(s2)
    assert verdict["median"] == 1.7 and verdict["holds"] is True
    report: dict[str, Any] = {
        "meta": {"mode": "quick", "pairs": 2, "seconds": 2, "elapsed_s": 1.0},
        nodes.PHASE1: summary, nodes.PHASE2: s2, "two_nodes_verdict": verdict}
    text = nodes.render(report)
    assert f"{PG}/{SQLITE} claims_per_s: 0.82 (0.75-0.89)" in text
    assert "median ratio 1.7: yes" in text


# --- the prepared data ------------------------------------------------------------------------


def test_ticket_rows_are_distinct_and_reproducible() -> None:
    rows = ticket_rows(500, seed=1)
    assert rows == ticket_rows(500, seed=1) and rows != ticket_rows(500, seed=2)
    assert len({pid for pid, _, _ in rows}) == 500
    assert all(len(pid) == 8 and pid != bytes(8) and len(txid) == 32 for pid, txid, _ in rows)
    heights = [h for _, _, h in rows]
    assert heights == sorted(heights) and heights[0] == data.FIRST_HEIGHT
    assert heights[-1] == data.FIRST_HEIGHT + 499 // data.PER_BLOCK


SELECT_TICKETS = ("SELECT pid, amount, created_at, token, claimed_at, seq FROM tickets "
                  "ORDER BY pid")
SELECT_TRANSFERS = ("SELECT txid, pid, amount, height, recorded_at, vanished_at, source "
                    "FROM transfers ORDER BY pid, txid")


def normalise(rows: list[Any]) -> list[tuple[Any, ...]]:
    return [tuple(bytes(v) if isinstance(v, memoryview) else v for v in row) for row in rows]


def test_the_same_tickets_in_sqlite_and_postgres(tmp_path: Path, pg_dsn: str) -> None:
    rows = ticket_rows(300, seed=7)
    path = tmp_path / "anon-ticket.db"
    assert write_sqlite(path, rows) > 0
    assert write_postgres(pg_dsn, rows) > 0
    lite = sqlite3.connect(path)
    try:
        lite_tickets = normalise(lite.execute(SELECT_TICKETS).fetchall())
        lite_transfers = normalise(lite.execute(SELECT_TRANSFERS).fetchall())
        lite_claim = lite.execute(CLAIM_READ, (rows[0][0],)).fetchone()
        migrations = lite.execute("SELECT count(*) FROM _sqlite_migrations").fetchone()
    finally:
        lite.close()
    with psycopg.connect(pg_dsn) as conn:
        pg_tickets = normalise(conn.execute(SELECT_TICKETS).fetchall())
        pg_transfers = normalise(conn.execute(SELECT_TRANSFERS).fetchall())
        pg_claim = conn.execute(CLAIM_READ.replace("?", "%s"), (rows[0][0],)).fetchone()
        applied = conn.execute("SELECT count(*) FROM schema_migrations").fetchone()
    assert migrations is not None and migrations[0] == len(schema.KNOWN)
    assert applied is not None and applied[0] == len(schema.KNOWN_POSTGRES)
    # fresh, unclaimed tickets with one transfer each, row for row the same in both
    expected = sorted((pid, data.AMOUNT, nodes.CREATED_AT, None, None, 1)
                      for pid, _, _ in rows)
    assert lite_tickets == pg_tickets == expected
    assert lite_transfers == pg_transfers == sorted(
        ((txid, pid, data.AMOUNT, height, nodes.RECORDED_AT, None, "chain")
         for pid, txid, height in rows), key=lambda t: (t[1], t[0]))
    # what a claim reads first: the amount, no token, the ticket's transfer
    assert lite_claim is not None and pg_claim is not None
    assert (lite_claim[0], lite_claim[1], bytes(lite_claim[2])) == (
        pg_claim[0], pg_claim[1], bytes(pg_claim[2])) == (data.AMOUNT, None, rows[0][1])


def test_the_feed_benchmark_reports_both_modes_of_one_run(tmp_path: Path,
                                                          pg_server: Any) -> None:
    """(`pg_server`: the binaries are there; the benchmark starts a server of its own.)"""
    from tests.bench import feed

    out = tmp_path / "feed.json"
    report = feed.run(reps=1, payments=10, idle_s=0.5, out=out)
    assert [(r["rep"], r["mode"]) for r in report["runs"]] == [(0, "notify"), (0, "poll")]
    assert set(report["summary"]) == {"idle_reads_per_s", "ack_ms_median", "ack_ms_p99"}
    for figures in report["summary"].values():
        assert figures["notify"] > 0 and figures["poll"] > 0
    assert out.read_text().startswith("{")
