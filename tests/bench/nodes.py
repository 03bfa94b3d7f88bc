"""Claims on PostgreSQL against SQLite, and two nodes against one on one PostgreSQL database.

`python -m tests.bench.nodes [--quick] [--out FILE.json] [--pairs N] [--seconds S] [--keep]`

Data. N fresh, unclaimed tickets (one transfer each, 1 XMR: above the minimum payment), the
same rows everywhere (`ticket_rows`): written into an SQLite database migrated by
`anon_ticket.schema.migrate` (one sqlite3 transaction, `write_sqlite`), and into a PostgreSQL
database migrated by `anon_ticket.schema.migrate_postgres` (COPY, `write_postgres`), then
`VACUUM (FREEZE, ANALYZE)` as autovacuum would have left a settled table. Each PostgreSQL
configuration gets its own copy of it (`CREATE DATABASE ... TEMPLATE`), so each claims from
its own fresh ids; a CHECKPOINT follows, so no run pays for the preparation's writes.

PostgreSQL is one real server (`tests.pgserver.PgServer(fsync=True)`: Debian's binaries, a
throwaway cluster over a unix socket, otherwise the defaults: `synchronous_commit=on`, every
COMMIT waits for its WAL flush). The servers are `anon-ticket serve` processes started as
`tests.bench.procs.spawn_server` starts them (`--workers 1`, `--unknown-rate-per-sec 0`, no
wallet listening; the poller is paused once ready, on whichever node leads it):

- `sqlite`: the embedded database (WAL, `synchronous=NORMAL`, actors/storage.py: a COMMIT
  does not fsync, the WAL is synced at checkpoints; a power loss may lose the last
  transactions and never corrupts);
- `postgres`: one node on PostgreSQL (`--database-url`);
- `postgres_sync_off`: the same on a database with `ALTER DATABASE ... SET synchronous_commit
  = off` (COMMIT returns before its WAL flush, which the walwriter does within a few
  hundred ms: a crash may lose the last transactions and never corrupts, the durability
  SQLite has here), so the comparison can be made at equal durability too;
- `two_nodes`: two nodes (each its own data directory, the same token secret, as an operator
  sets them up) on one more copy of the database.

Phase 1, `sqlite_vs_postgres`: per repetition, `new_claims` (fresh ids, each sent once, wrk's
Lua replay at 64 connections, as many ids as 3x the fastest rate the configuration has
shown, the unsent ones back) then `already_claimed` (the ids it claimed in that run), each on
sqlite, postgres and postgres_sync_off back to back, in an order that changes from one group
to the next (`run_order`: sqlite and postgres swap every time, each configuration goes first
as often as the others). Ratios over sqlite are taken within a repetition.
`two_nodes` starts after this phase (and sqlite and postgres_sync_off are stopped), so
phase 1 runs beside no idle node of it.

Phase 2, `two_nodes_vs_one`: the `postgres` node alone against `two_nodes`, each driven by two
wrk processes at once (32 connections each, half the ids each; on two nodes, one wrk a node),
the same load generator on both sides, in pairs whose order swaps every time. In
`already_claimed` each node is asked for the ids the other claimed (as a load balancer would
send them); the cluster feed has filled its cache. Claims per second: all claims of the run
over its longer wrk's duration.

Per run: claims per second (completed answers of the scenario's kind over wrk's duration),
the server's CPU seconds (the process tree of each node, `workers.tree_cpu`/`cpu_delta`),
PostgreSQL's CPU seconds (the postmaster and every process under it: `pg_tree_reading`,
`pg_cpu_delta`; utime + stime of each, plus for each the time of the children it reaped, so
a backend that ends in a run is still counted) split into the run's database's backends, the
server-wide processes (postmaster, walwriter, checkpointer, background writer, autovacuum
launcher, ...) and the other databases' backends (idle nodes); claims per server CPU second
and per (server + database) CPU second, the latter the fair figure for PostgreSQL; WAL bytes
and (approximately: pg_stat_wal is flushed late) WAL fsyncs; the storage actor's batch
sizes; wrk's CPU; the idle servers' CPU; what else the machine ran (its busy time less all
of these) and the host's steal.

The machine is shared: before each group of runs, wait briefly for a quiet machine
(`workers.wait_quiet`, the servers and PostgreSQL counted as ours), and report the ratios
over the quiet groups apart, as `tests.bench.workers` does. Nothing is pinned.

`--quick` (one repetition of 2 s runs, 60k tickets: about a minute) is a smoke test; the
full run (five repetitions of 5 s runs, 250k tickets: about six minutes on a quiet machine,
at most one more waiting for quiet) is the one to read. 250k is several times what the runs
use at the rates seen so far (a node claims a few thousand a second on one core); a run
that runs out of fresh ids stops early and says so.
"""

from __future__ import annotations

import json
import os
import platform
import random
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg import sql

from anon_ticket import schema
from anon_ticket.datadir import DataDir
from tests.bench import cli, data, procs, workers, wrk
from tests.bench.workers import (
    CpuDelta,
    cpu_delta,
    lines_for,
    machine_cpu,
    noise,
    paired_ratios,
    spread,
    tree_cpu,
    wait_quiet,
)
from tests.bench.wrk import WrkResult
from tests.pgserver import PgServer
from tests.process.proc import ServerProcess

Log = Callable[[str], None]

REDEEM = "/api/v1/redeem"
CONNECTIONS = 64
SCENARIOS = ("new_claims", "already_claimed")
EXPECTED = {s: workers.EXPECTED[s] for s in SCENARIOS}
SQLITE, PG, PG_SYNC_OFF, TWO_NODES = "sqlite", "postgres", "postgres_sync_off", "two_nodes"
PHASE1_CONFIGS = (SQLITE, PG, PG_SYNC_OFF)  # the base first: ratios are X / sqlite
PHASE2_CONFIGS = (PG, TWO_NODES)  # ratios two_nodes / postgres
PHASE1, PHASE2 = "sqlite_vs_postgres", "two_nodes_vs_one"
DATABASES = {PG: "bench_pg", PG_SYNC_OFF: "bench_pg_sync_off", TWO_NODES: "bench_pg_two"}
TEMPLATE_DB = "bench_data"
METRICS = ("claims_per_s", "claims_per_cpu_s", "claims_per_server_cpu_s")
QUIET = workers.QUIET
CREATED_AT = "2025-11-20T12:34:56.123456Z"
RECORDED_AT = "2025-11-20T12:35:00.000000Z"
BATCHES = workers.BATCHES
SEED = 20251120
# A new-claims run takes fresh ids for this many times the fastest rate the configuration has
# shown (`workers.lines_for`; the unsent ones go back): a rate from one noisy run may be half
# the next one's, and an id taken but not sent costs nothing.
NEW_CLAIMS_MARGIN = 3.0


@dataclass(frozen=True)
class Plan:
    mode: str
    pairs: int  # repetitions of each phase
    seconds: int  # one wrk run
    tickets: int  # fresh ids in each database (each configuration claims from its copy)
    warmup_s: int
    quiet_wait: float = 5.0  # before each group of runs, wait up to this for a quiet machine
    quiet_budget: float = 60.0  # ... and up to this over the whole run
    connections: int = CONNECTIONS


QUICK = Plan("quick", pairs=1, seconds=2, tickets=60_000, warmup_s=1, quiet_wait=3.0,
             quiet_budget=10.0)
FULL = Plan("full", pairs=5, seconds=5, tickets=250_000, warmup_s=2)


# --- the data (the same rows in SQLite and in PostgreSQL) -------------------------------------

TicketRow = tuple[bytes, bytes, int]  # pid (8 bytes), txid (32 bytes), height


def ticket_rows(count: int, seed: int = SEED) -> list[TicketRow]:
    """`count` fresh tickets, one transfer each: distinct payment ids (never all zeros),
    random txids, heights rising `data.PER_BLOCK` a block from `data.FIRST_HEIGHT`. The same
    seed gives the same rows."""
    rng = random.Random(seed)
    seen: set[bytes] = set()
    rows: list[TicketRow] = []
    while len(rows) < count:
        pid = rng.randbytes(8)
        if pid == bytes(8) or pid in seen:
            continue
        seen.add(pid)
        rows.append((pid, rng.randbytes(32), data.FIRST_HEIGHT + len(rows) // data.PER_BLOCK))
    return rows


def write_sqlite(path: Path, rows: Sequence[TicketRow]) -> float:
    """Migrate the SQLite database at `path` (`schema.migrate`) and insert the tickets and
    their transfers in one transaction; the seconds it took."""
    started = time.perf_counter()
    schema.migrate(path)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO tickets (pid, amount, created_at, seq) VALUES (?, ?, ?, 1)",
            [(pid, data.AMOUNT, CREATED_AT) for pid, _, _ in rows])
        conn.executemany(
            "INSERT INTO transfers (txid, pid, amount, height, recorded_at) "
            "VALUES (?, ?, ?, ?, ?)",
            [(txid, pid, data.AMOUNT, height, RECORDED_AT) for pid, txid, height in rows])
        conn.execute("COMMIT")
    finally:
        conn.close()
    return time.perf_counter() - started


def write_postgres(dsn: str, rows: Sequence[TicketRow]) -> float:
    """Migrate the PostgreSQL database at `dsn` (`schema.migrate_postgres`) and COPY the
    tickets and their transfers in, in one transaction; the seconds it took."""
    started = time.perf_counter()
    schema.migrate_postgres(dsn)
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        with conn.cursor() as cur:
            with cur.copy("COPY tickets (pid, amount, created_at, seq) FROM STDIN") as copy:
                for pid, _, _ in rows:
                    copy.write_row((pid, data.AMOUNT, CREATED_AT, 1))
            with cur.copy("COPY transfers (txid, pid, amount, height, recorded_at) "
                          "FROM STDIN") as copy:
                for pid, txid, height in rows:
                    copy.write_row((txid, pid, data.AMOUNT, height, RECORDED_AT))
        conn.commit()
    return time.perf_counter() - started


# --- CPU of the PostgreSQL server: the postmaster and every process under it ------------------


def parse_stat(text: str) -> tuple[int, float, float]:
    """(ppid, own CPU seconds, CPU seconds of the children it reaped) from /proc/PID/stat:
    utime + stime, and cutime + cstime. Fields counted from the last `)` (the command name
    may hold spaces and parentheses)."""
    fields = text.rpartition(")")[2].split()
    tck = workers.CLK_TCK
    return (int(fields[1]), (int(fields[11]) + int(fields[12])) / tck,
            (int(fields[13]) + int(fields[14])) / tck)


# Server-wide processes (not a session's backend), by the start of their title.
PG_BACKGROUND = ("checkpointer", "background writer", "walwriter", "autovacuum launcher",
                 "logical replication launcher", "archiver", "stats collector", "startup",
                 "walreceiver", "walsummarizer", "io worker", "parallel worker",
                 "background worker", "logger")


def pg_role(title: str) -> tuple[str, str | None]:
    """What a PostgreSQL process is, from its title (/proc/PID/cmdline, NULs as spaces) and
    the database it works in: `postgres: anon bench_pg [local] idle` is a backend of
    bench_pg; `postgres: walwriter` a server-wide process; an autovacuum worker names its
    database."""
    text = title.replace("\0", " ").strip()
    if not text.startswith("postgres: "):
        return "other", None
    rest = text[len("postgres: "):].strip()
    if rest.startswith("autovacuum worker"):
        words = rest.split()
        return "autovacuum worker", words[2] if len(words) > 2 else None
    for name in PG_BACKGROUND:
        if rest == name or rest.startswith(name + " "):
            return name, None
    words = rest.split()
    if len(words) >= 2:
        return "backend", words[1]
    return rest or "other", None


@dataclass(frozen=True)
class PgProc:
    ppid: int
    cpu_s: float  # its own utime + stime, plus the children it reaped
    role: str
    database: str | None


def tree_members(parents: Mapping[int, int], root: int) -> list[int]:
    """`root` and every process under it (`parents`: pid -> ppid of every process on the
    machine); none when `root` is not among them."""
    if root not in parents:
        return []
    kids: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        kids.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, ()))
    return sorted(out)


def pg_tree_reading(stats: Mapping[int, str], cmdlines: Mapping[int, str], root: int
                    ) -> dict[int, PgProc]:
    """The postmaster `root` and the processes under it at one moment, from their
    /proc/PID/stat (`stats`: every process on the machine, to find the tree) and titles."""
    parsed = {pid: parse_stat(text) for pid, text in stats.items()}
    members = tree_members({pid: p[0] for pid, p in parsed.items()}, root)
    out: dict[int, PgProc] = {}
    for pid in members:
        ppid, own, reaped = parsed[pid]
        role, database = ("postmaster", None) if pid == root else pg_role(
            cmdlines.get(pid, ""))
        out[pid] = PgProc(ppid, own + reaped, role, database)
    return out


@dataclass(frozen=True)
class DbCpu:
    """PostgreSQL's CPU seconds over a run, by whom."""

    total_s: float  # the whole tree
    database_s: float  # backends (and autovacuum workers) of the run's database
    shared_s: float  # postmaster, walwriter, checkpointer, ...: server-wide
    others_s: float  # backends of other databases (idle nodes)
    by_role: dict[str, float]
    ended: int = 0  # processes gone by the second reading (counted under their parent)

    @property
    def attributed_s(self) -> float:
        """What the run's database cost: its backends and the server-wide processes."""
        return self.database_s + self.shared_s

    def as_dict(self) -> dict[str, Any]:
        return {"total_s": round(self.total_s, 3), "database_s": round(self.database_s, 3),
                "shared_s": round(self.shared_s, 3), "others_s": round(self.others_s, 3),
                "attributed_s": round(self.attributed_s, 3),
                "by_role": {k: round(v, 3) for k, v in sorted(self.by_role.items())},
                **({"ended": self.ended} if self.ended else {})}


def pg_cpu_delta(before: Mapping[int, PgProc], after: Mapping[int, PgProc], root: int,
                 database: str | None) -> DbCpu:
    """What the tree used between two readings. Each process counts its own CPU and that of
    the children it reaped, so the tree's total is the sum of the second reading less the
    first: a process that ended meanwhile is in its parent's reaped time, whole, and what it
    had used by the first reading is taken off that parent (its time in the run is counted
    under the parent's role). A process that started meanwhile counts from zero. `database`:
    the run's (None: no database of this server is the run's, as for an SQLite run)."""
    by_pid = {pid: p.cpu_s - (before[pid].cpu_s if pid in before else 0.0)
              for pid, p in after.items()}
    ended = 0
    for pid, p in before.items():
        if pid in after:
            continue
        ended += 1
        heir = p.ppid if p.ppid in after else root
        by_pid[heir] = by_pid.get(heir, 0.0) - p.cpu_s
    by_role: dict[str, float] = {}
    mine = shared = others = 0.0
    for pid, cpu in by_pid.items():
        proc = after.get(pid) or before.get(pid)
        assert proc is not None
        by_role[proc.role] = by_role.get(proc.role, 0.0) + cpu
        if proc.database is None:
            shared += cpu
        elif proc.database == database:
            mine += cpu
        else:
            others += cpu
    return DbCpu(sum(by_pid.values()), mine, shared, others, by_role, ended)


def read_proc_stats() -> dict[int, str]:
    """/proc/PID/stat of every process on the machine."""
    out: dict[int, str] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    out[int(entry.name)] = f.read()
            except OSError:
                continue  # ended meanwhile
    return out


def read_pg_tree(root: int) -> dict[int, PgProc]:
    """The postmaster's tree now (`pg_tree_reading` on /proc)."""
    stats = read_proc_stats()
    parents = {pid: parse_stat(text)[0] for pid, text in stats.items()}
    cmdlines: dict[int, str] = {}
    for pid in tree_members(parents, root):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdlines[pid] = f.read().decode(errors="replace")
        except OSError:
            continue
    return pg_tree_reading(stats, cmdlines, root)


# --- orders, lines, ratios ----------------------------------------------------------------------


def run_order(configs: Sequence[str], rep: int, scenario_index: int) -> tuple[str, ...]:
    """Which configuration runs when in a group (a repetition's scenario). Two: they swap
    every time (`workers.pair_order`). Three (a, b, c): the six orders in turn, so that a and
    b (the ratio's base and its subject) swap every time and each goes first as often as the
    others over six groups. More: rotated by one each time."""
    j = rep + scenario_index
    if len(configs) == 3:
        a, b, c = configs
        return ((a, b, c), (b, c, a), (c, a, b), (b, a, c), (a, c, b), (c, b, a))[j % 6]
    k = j % len(configs)
    return tuple(configs[k:]) + tuple(configs[:k])


def split_lines(items: Sequence[bytes], parts: int) -> list[list[bytes]]:
    """`items` dealt round-robin into `parts` lists (one a wrk process)."""
    return [list(items[k::parts]) for k in range(parts)]


def already_lines(recent_by_node: Sequence[Sequence[bytes]], generators: int
                  ) -> list[list[bytes]]:
    """The ids each wrk process (k, driving node k % nodes) asks again: those the next node
    claimed (on one node, its own), dealt among the processes on that node."""
    nodes = len(recent_by_node)
    out: list[list[bytes]] = []
    for k in range(generators):
        node = k % nodes
        source = recent_by_node[(node + 1) % nodes]
        mates = [g for g in range(generators) if g % nodes == node]
        out.append(list(source[mates.index(k)::len(mates)]))
    return out


def ratios_against(by_config: Mapping[str, Sequence[float | None]], base: str
                   ) -> dict[str, dict[str, Any]]:
    """For each configuration but `base`, its values over base's, repetition by repetition
    (`workers.paired_ratios`), as a spread (median, min, max, every ratio); keyed
    `X/base`."""
    return {f"{name}/{base}": spread(paired_ratios(values, by_config[base]))
            for name, values in by_config.items() if name != base}


def per_second(count: float, seconds: float) -> float | None:
    return count / seconds if seconds > 0 else None


# --- servers and runs ---------------------------------------------------------------------------


def _body(pid: bytes) -> str:
    return json.dumps({"pid": pid.hex()}, separators=(",", ":"))


@dataclass
class Config:
    name: str
    nodes: list[ServerProcess]
    database: str | None  # PostgreSQL's database (None: SQLite)
    pool: list[bytes]  # fresh ids not yet sent to it
    recent: list[list[bytes]] = field(default_factory=list)  # by node: claimed in its last run
    rate: float = 0.0  # the fastest new-claims rate it has shown (claims/s)

    @property
    def pids(self) -> list[int]:
        return [n.proc.pid for n in self.nodes]


@dataclass
class Run:
    phase: str
    rep: int  # -1: warm-up
    scenario: str
    config: str
    position: int  # its place in its group
    database: str | None
    results: list[WrkResult]
    connections: list[int]
    server_cpu: list[CpuDelta]
    server_pids: list[int]
    db: DbCpu | None
    wall_s: float
    idle_servers_cpu_s: float = 0.0
    other_cpu_s: float = 0.0
    steal_s: float = 0.0
    wal_bytes: int | None = None
    wal_syncs: int | None = None
    batches: list[dict[str, Any]] = field(default_factory=list)

    @property
    def claims(self) -> int:
        return sum(r.count_of(EXPECTED[self.scenario]) for r in self.results)

    @property
    def answers(self) -> int:
        return sum(sum(r.counts.values()) for r in self.results)

    @property
    def duration_s(self) -> float:
        return max(r.duration_s for r in self.results)

    @property
    def claims_per_s(self) -> float | None:
        return per_second(self.claims, self.duration_s)

    @property
    def server_cpu_s(self) -> float:
        return sum(d.seconds for d in self.server_cpu)

    @property
    def db_cpu_s(self) -> float:
        """PostgreSQL's CPU for this run's database (0 on SQLite: it runs in the server)."""
        return self.db.attributed_s if self.db is not None and self.database else 0.0

    @property
    def cpu_s(self) -> float:
        return self.server_cpu_s + self.db_cpu_s

    @property
    def claims_per_cpu_s(self) -> float | None:
        return per_second(self.claims, self.cpu_s)

    @property
    def claims_per_server_cpu_s(self) -> float | None:
        return per_second(self.claims, self.server_cpu_s)

    @property
    def wrk_cpu_s(self) -> float:
        return sum((r.generator_cpu or 0.0) * self.wall_s for r in self.results)

    @property
    def noise(self) -> float:
        return noise(self.other_cpu_s + self.steal_s, self.duration_s)

    def metric(self, name: str) -> float | None:
        value: float | None = getattr(self, name)
        return value

    def as_dict(self) -> dict[str, Any]:
        def r(x: float | None, d: int = 1) -> float | None:
            return None if x is None else round(x, d)

        good = self.claims
        answers = self.answers
        return {
            "phase": self.phase, "rep": self.rep, "scenario": self.scenario,
            "config": self.config, "position": self.position,
            "claims": good, "claims_per_s": r(self.claims_per_s),
            "duration_s": round(self.duration_s, 3), "wall_s": round(self.wall_s, 3),
            "server_cpu_s": round(self.server_cpu_s, 3), "db_cpu_s": round(self.db_cpu_s, 3),
            "claims_per_cpu_s": r(self.claims_per_cpu_s),
            "claims_per_server_cpu_s": r(self.claims_per_server_cpu_s),
            "cpu_us_per_claim": r(1e6 * self.cpu_s / good) if good else None,
            "server_cpu_util": round(self.server_cpu_s / self.duration_s, 3)
            if self.duration_s else None,
            "server_cpu": [d.as_dict(pid) for d, pid in zip(self.server_cpu,
                                                            self.server_pids, strict=True)],
            "postgres_cpu": self.db.as_dict() if self.db is not None else None,
            "wal_bytes": self.wal_bytes,
            "wal_bytes_per_claim": r(self.wal_bytes / good) if self.wal_bytes is not None
            and good else None,
            "wal_syncs_approx": self.wal_syncs,
            "storage_batches": self.batches or None,
            "wrk": [{"connections": c, "rps": round(x.rps, 1), "requests": x.requests,
                     "duration_s": round(x.duration_s, 3), "cpu": x.generator_cpu,
                     "p50_ms": round(x.p50_ms, 3), "p99_ms": round(x.p99_ms, 3),
                     "counts": x.counts, "socket_errors": x.socket_errors,
                     "exhausted": x.exhausted}
                    for x, c in zip(self.results, self.connections, strict=True)],
            "expected_pct": round(100 * good / answers, 2) if answers else None,
            "wrk_cpu_s": round(self.wrk_cpu_s, 3),
            "idle_servers_cpu_s": round(self.idle_servers_cpu_s, 3),
            "other_cpu_s": round(self.other_cpu_s, 3), "steal_s": round(self.steal_s, 3),
        }


def pause_poller(node: ServerProcess) -> str:
    """Pause the node's poller; a standby (no lock yet, or another node leads) refuses:
    'standby'."""
    try:
        procs.poller(node, "pause")
    except httpx.HTTPStatusError:
        return "standby"
    return "paused"


def pause_leader(nodes: Sequence[ServerProcess], timeout: float = 20.0) -> list[str]:
    """Pause the poller of whichever node leads it (a node serves before it has the lock, which
    it tries for every second); each node's answer."""
    deadline = time.monotonic() + timeout
    while True:
        states = [pause_poller(n) for n in nodes]
        if "paused" in states or time.monotonic() > deadline:
            return states
        time.sleep(0.2)


class Bench:
    def __init__(self, plan: Plan, work: Path, log: Log) -> None:
        self.plan = plan
        self.work = work
        self.log = log
        self.script = wrk.write_script(work)
        self.pg: PgServer | None = None
        self.configs: dict[str, Config] = {}
        self.runs: list[Run] = []
        self.warmups: list[Run] = []
        self.gates: list[dict[str, Any]] = []
        self.meta: dict[str, Any] = {}
        self._files = 0
        self._fresh: list[bytes] = []
        self._secret: Path | None = None
        # one session for the WAL figures, kept open (a backend of its own, not of a run's
        # database: no process starts or ends around a run for it)
        self._monitor: psycopg.Connection[tuple[Any, ...]] | None = None

    # --- set-up --------------------------------------------------------------------------

    def _file(self, lines: Sequence[str]) -> Path:
        self._files += 1
        return wrk.write_lines(self.work / f"lines-{self._files}.txt", lines)

    @property
    def postmaster(self) -> int:
        assert self.pg is not None
        pid = self.pg.pid()
        if pid is None:
            raise RuntimeError(f"PostgreSQL is not running:\n{self.pg.log_tail()}")
        return pid

    def _admin(self, dbname: str = "postgres") -> psycopg.Connection[tuple[Any, ...]]:
        assert self.pg is not None
        return psycopg.connect(self.pg.dsn(dbname), autocommit=True, connect_timeout=10)

    def prepare(self) -> None:
        p = self.plan
        rows = ticket_rows(p.tickets)
        self._fresh = [pid for pid, _, _ in rows]
        self.log(f"preparing {p.tickets} fresh tickets in SQLite and PostgreSQL")
        sqlite_s = write_sqlite(self.work / "sqlite" / "anon-ticket.db", rows)
        self.pg = PgServer(fsync=True).start()
        pg_s = write_postgres(self.pg.create_database(TEMPLATE_DB), rows)
        with self._admin(TEMPLATE_DB) as conn:
            conn.execute("VACUUM (FREEZE, ANALYZE)")
        clone_started = time.perf_counter()
        with self._admin() as conn:
            for name in DATABASES.values():
                conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                    sql.Identifier(name), sql.Identifier(TEMPLATE_DB)))
            conn.execute(sql.SQL("ALTER DATABASE {} SET synchronous_commit = off").format(
                sql.Identifier(DATABASES[PG_SYNC_OFF])))
            conn.execute("CHECKPOINT")
        clone_s = time.perf_counter() - clone_started
        for name in DATABASES.values():
            with self._admin(name) as conn:
                row = conn.execute("SELECT count(*) FROM tickets WHERE token IS NULL"
                                   ).fetchone()
                if row is None or row[0] != p.tickets:
                    raise RuntimeError(f"{name}: {row} fresh tickets, {p.tickets} expected")
        self.log(f"  sqlite {sqlite_s:.1f} s, postgres COPY {pg_s:.1f} s, "
                 f"{len(DATABASES)} copies {clone_s:.1f} s")
        self.meta["prepared"] = {
            "tickets": p.tickets, "amount": data.AMOUNT, "sqlite_insert_s": round(sqlite_s, 2),
            "postgres_copy_s": round(pg_s, 2), "postgres_clone_s": round(clone_s, 2),
            "postgres": "migrate_postgres + COPY into a template, VACUUM (FREEZE, ANALYZE), "
                        "one CREATE DATABASE ... TEMPLATE per configuration, CHECKPOINT",
            "sqlite": "schema.migrate + one sqlite3 transaction of INSERTs"}
        self.meta["postgres"] = self._pg_settings()

    def _pg_settings(self) -> dict[str, Any]:
        names = ("server_version", "fsync", "synchronous_commit", "wal_sync_method",
                 "full_page_writes", "wal_level", "shared_buffers", "max_wal_size",
                 "checkpoint_timeout", "wal_writer_delay", "commit_delay")
        out: dict[str, Any] = {}
        with self._admin() as conn:
            for name in names:
                row = conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()
                out[name] = row[0] if row else None
        out["synchronous_commit_by_database"] = {}
        for config, dbname in DATABASES.items():
            with self._admin(dbname) as conn:
                row = conn.execute("SHOW synchronous_commit").fetchone()
                out["synchronous_commit_by_database"][config] = row[0] if row else None
        out["data_dir"] = str(self.pg.data_dir) if self.pg else None
        out["checkpoints_at_start"] = self._checkpoints()
        return out

    def _checkpoints(self) -> dict[str, int] | None:
        with self._admin() as conn:
            for query in ("SELECT num_timed, num_requested FROM pg_stat_checkpointer",
                          "SELECT checkpoints_timed, checkpoints_req FROM pg_stat_bgwriter"):
                try:
                    row = conn.execute(query).fetchone()
                except psycopg.Error:
                    continue
                if row is not None:
                    return {"timed": int(row[0]), "requested": int(row[1])}
        return None

    def _wal(self) -> tuple[int, int | None]:
        """WAL position (bytes) and WAL fsyncs so far (pg_stat_wal; backends flush it late)."""
        if self._monitor is None:
            self._monitor = self._admin()
        conn = self._monitor
        row = conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()
        lsn = int(row[0]) if row else 0
        try:
            sync = conn.execute("SELECT wal_sync FROM pg_stat_wal").fetchone()
        except psycopg.Error:
            sync = None
        return lsn, int(sync[0]) if sync else None

    def _spawn(self, name: str, *, node: str | None = None) -> ServerProcess:
        extra: list[str] = []
        if name == SQLITE:
            data_dir = self.work / "sqlite"
        else:
            assert self.pg is not None
            node = node or name
            data_dir = self.work / node
            extra = ["--database-url", self.pg.dsn(DATABASES[name]), "--node-name", node]
            if name == TWO_NODES:  # the nodes share the token secret (docs/architecture.md §9)
                secret = DataDir(data_dir).secret_path
                if self._secret is None:
                    DataDir(data_dir).token_secret()
                    self._secret = secret
                else:
                    DataDir(data_dir).ensure()
                    shutil.copy2(self._secret, secret)
        return procs.spawn_server(data_dir, cpus=None, log_dir=self.work, extra=extra)

    def start(self, names: Sequence[str]) -> None:
        """Start the configurations' servers at once; each ready, single-process, its poller
        paused (on the node that leads it), warmed up by a short new-claims run."""
        spawned: dict[str, list[ServerProcess]] = {}
        try:
            for name in names:
                node_names = ["node-a", "node-b"] if name == TWO_NODES else [None]
                spawned[name] = [self._spawn(name, node=n) for n in node_names]
            for group in spawned.values():
                for node in group:
                    node.wait_ready(120, interval=0.01)
        except BaseException:
            for group in spawned.values():
                for node in group:
                    node.stop()
            raise
        started = self.meta.setdefault("servers", {})
        for name, nodes in spawned.items():
            config = Config(name, nodes, DATABASES.get(name), list(self._fresh),
                            [[] for _ in nodes])
            self.configs[name] = config
            info = []
            for node, poller in zip(nodes, pause_leader(nodes), strict=True):
                kids = workers.children(node.proc.pid)
                if kids:
                    raise RuntimeError(f"{name}: --workers 1 has children {kids}")
                info.append({"ready_s": round(node.ready_s or 0.0, 2), "poller": poller,
                             "log": str(node.log_path)})
            if not any(i["poller"] == "paused" for i in info):
                raise RuntimeError(f"{name}: no node paused its poller: {info}")
            started[name] = info
            self.log(f"{name}: {len(nodes)} node(s) ready in "
                     f"{', '.join(str(i['ready_s']) for i in info)} s")
        for name in spawned:
            generators = 2 if name == TWO_NODES else 1
            warm = self._drive("warmup", -1, "new_claims", self.configs[name], 0, generators,
                               seconds=self.plan.warmup_s, guess=3000.0)
            self.warmups.append(warm)

    def stop(self, names: Sequence[str] | None = None) -> None:
        for name in list(names if names is not None else self.configs):
            config = self.configs.get(name)
            if config is None:
                continue
            for node in config.nodes:
                node.stop()
            if names is not None:
                del self.configs[name]

    def close(self) -> None:
        try:
            for config in self.configs.values():
                for node in config.nodes:
                    node.stop()
        finally:
            if self._monitor is not None:
                self._monitor.close()
            if self.pg is not None:
                self.pg.close()

    # --- one run -------------------------------------------------------------------------

    def _lines(self, config: Config, scenario: str, generators: int, seconds: int,
               guess: float) -> list[list[bytes]]:
        """Each wrk process's ids (new claims: fresh ids taken from the pool)."""
        if scenario == "already_claimed":
            chunks = already_lines(config.recent, generators)
            if not all(chunks):
                raise RuntimeError(f"{config.name}: nothing claimed to ask again")
            return chunks
        want = lines_for(config.rate or guess, seconds, self.plan.connections,
                         margin=NEW_CLAIMS_MARGIN)
        take = config.pool[:want]
        del config.pool[:len(take)]
        if len(take) < want:
            self.log(f"  warning: {config.name}: {len(take)} fresh ids left for {want} "
                     "wanted (the run stops when they run out)")
        return split_lines(take, generators)

    def _drive(self, phase: str, rep: int, scenario: str, config: Config, position: int,
               generators: int, *, seconds: int | None = None, guess: float = 0.0) -> Run:
        """One run: `generators` wrk processes at once on the configuration's nodes (process
        k on node k % nodes, the connections shared out), the CPU of everything around it."""
        seconds = seconds or self.plan.seconds
        chunks = self._lines(config, scenario, generators, seconds, guess)
        once = scenario == "new_claims"
        conns = [self.plan.connections // generators] * generators
        targets = [config.nodes[k % len(config.nodes)] for k in range(generators)]
        files = [self._file([_body(b) for b in chunk]) for chunk in chunks]
        idle = [c for c in self.configs.values() if c is not config]
        root = self.postmaster
        metrics_before = [procs.read_metrics(n) for n in config.nodes] if once else []
        wal_before = self._wal() if config.database else None
        idle_before = [tree_cpu(pid) for c in idle for pid in c.pids]
        pg_before = read_pg_tree(root)
        busy_before, steal_before = machine_cpu()
        before = [tree_cpu(pid) for pid in config.pids]
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=generators) as pool:
            futures = [pool.submit(wrk.run_wrk, node.url, script=self.script, method="POST",
                                   path=REDEEM, lines_file=f, connections=c,
                                   duration_s=seconds, once=once)
                       for node, f, c in zip(targets, files, conns, strict=True)]
            results = [f.result() for f in futures]
        wall = time.perf_counter() - started
        server = [cpu_delta(b, tree_cpu(pid)) for b, pid in zip(before, config.pids,
                                                                strict=True)]
        busy_after, steal_after = machine_cpu()
        pg_after = read_pg_tree(root)
        idle_after = [tree_cpu(pid) for c in idle for pid in c.pids]
        db = pg_cpu_delta(pg_before, pg_after, root, config.database)
        run = Run(phase, rep, scenario, config.name, position, config.database, results,
                  conns, server, config.pids, db, wall)
        run.idle_servers_cpu_s = sum(cpu_delta(b, a).seconds
                                     for b, a in zip(idle_before, idle_after, strict=True))
        run.steal_s = steal_after - steal_before
        run.other_cpu_s = max(0.0, busy_after - busy_before - run.server_cpu_s - db.total_s
                              - run.idle_servers_cpu_s - run.wrk_cpu_s)
        if wal_before is not None:
            lsn, syncs = self._wal()
            run.wal_bytes = lsn - wal_before[0]
            if syncs is not None and wal_before[1] is not None:
                run.wal_syncs = syncs - wal_before[1]
        if once:
            recent: list[list[bytes]] = [[] for _ in config.nodes]
            for k, (chunk, result) in enumerate(zip(chunks, results, strict=True)):
                sent, unsent = wrk.split_sent(chunk, result)
                config.pool[:0] = unsent
                # certainly claimed by now: the last `connections` sent may have been cut off
                done = max(0, result.count_of(EXPECTED["new_claims"]) - conns[k])
                recent[k % len(config.nodes)].extend(sent[:max(done, 1)])
                if result.exhausted and rep >= 0:
                    self.log(f"  warning: {config.name} ran out of ids after "
                             f"{result.duration_s:.2f} s")
            config.recent = recent
            config.rate = max(config.rate, run.claims_per_s or 0.0)
            for node, text in zip(config.nodes, metrics_before, strict=True):
                run.batches.append(procs.bucket_distribution(procs.histogram_delta(
                    procs.histogram(text, BATCHES),
                    procs.histogram(procs.read_metrics(node), BATCHES))))
        answers = run.answers
        if answers and run.claims < 0.99 * answers:
            self.log(f"  warning: {scenario} {config.name}: "
                     f"{[r.counts for r in results]}")
        what = f"rep {rep + 1}" if rep >= 0 else "warm-up"
        self.log(f"  {what} {scenario:<15} {config.name:<17}: {run.claims_per_s or 0:7.0f} "
                 f"claims/s  {run.claims_per_cpu_s or 0:6.0f}/CPU-s (server "
                 f"{run.server_cpu_s:5.2f} + db {run.db_cpu_s:5.2f} s)  "
                 f"wrk {sum(r.generator_cpu or 0 for r in results):4.2f}  "
                 f"others {run.noise:4.2f} cores  p99 "
                 f"{max(r.p99_ms for r in results):6.1f} ms")
        return run

    # --- the phases ----------------------------------------------------------------------

    def _gate(self, phase: str, rep: int, scenario: str) -> None:
        p = self.plan
        budget = max(0.0, p.quiet_budget - sum(g["waited_s"] for g in self.gates))
        ours = [pid for c in self.configs.values() for pid in c.pids] + [self.postmaster]
        waited, load = wait_quiet(ours, limit=QUIET, max_wait=min(p.quiet_wait, budget))
        self.gates.append({"phase": phase, "rep": rep, "scenario": scenario,
                           "waited_s": round(waited, 2), "load": round(load, 2)})
        if load > QUIET:
            self.log(f"  (the machine runs {load:.2f} cores of other load: waited "
                     f"{waited:.1f} s, measuring anyway)")

    def measure(self, phase: str, names: Sequence[str], generators: Mapping[str, int]
                ) -> None:
        for rep in range(self.plan.pairs):
            self.log(f"{phase}: repetition {rep + 1}/{self.plan.pairs} (load average "
                     f"{', '.join(f'{x:.2f}' for x in os.getloadavg())})")
            for i, scenario in enumerate(SCENARIOS):
                self._gate(phase, rep, scenario)
                for k, name in enumerate(run_order(names, rep, i)):
                    self.runs.append(self._drive(phase, rep, scenario, self.configs[name], k,
                                                 generators[name]))


def phase_summary(runs: Sequence[Run], phase: str, names: Sequence[str]) -> dict[str, Any]:
    """Per scenario: each configuration's figures (spreads over repetitions), the ratios of
    every configuration over the first (within each repetition), and the same over the quiet
    repetitions alone."""
    base = names[0]
    out: dict[str, Any] = {}
    for scenario in SCENARIOS:
        by = {name: sorted((r for r in runs if r.phase == phase and r.scenario == scenario
                            and r.config == name), key=lambda r: r.rep) for name in names}
        cell: dict[str, Any] = {}
        for name, rs in by.items():
            cell[name] = {
                "claims_per_s": spread([x for r in rs if (x := r.claims_per_s)], 1),
                "claims_per_cpu_s": spread([x for r in rs if (x := r.claims_per_cpu_s)], 1),
                "claims_per_server_cpu_s": spread(
                    [x for r in rs if (x := r.claims_per_server_cpu_s)], 1),
                "server_cpu_util": spread([r.server_cpu_s / r.duration_s for r in rs
                                           if r.duration_s]),
                "db_cpu_util": spread([r.db_cpu_s / r.duration_s for r in rs
                                       if r.duration_s]),
                "cpu_us_per_claim": spread([1e6 * r.cpu_s / r.claims for r in rs if r.claims],
                                           1),
                "wal_bytes_per_claim": spread([r.wal_bytes / r.claims for r in rs
                                               if r.wal_bytes is not None and r.claims], 1),
                "mean_batch": spread([b["mean_batch"] for r in rs for b in r.batches
                                      if b.get("mean_batch") is not None], 2),
                "wrk_cpu_s": spread([r.wrk_cpu_s for r in rs]),
                "other_cpu_s": spread([r.other_cpu_s for r in rs]),
                "p99_ms": spread([max(x.p99_ms for x in r.results) for r in rs]),
            }
        cell["ratios"] = {metric: ratios_against(
            {name: [r.metric(metric) for r in rs] for name, rs in by.items()}, base)
            for metric in METRICS}
        groups = list(zip(*by.values(), strict=True))
        # a repetition is quiet when none of its runs saw more than QUIET cores of others
        quiet = [max(r.noise for r in g) <= QUIET for g in groups]
        cell["noise_by_rep"] = [round(max(r.noise for r in g), 2) for g in groups]
        kept = [g for g, q in zip(groups, quiet, strict=True) if q]
        cell["quiet_ratios"] = {"reps": len(kept), **{metric: ratios_against(
            {name: [g[j].metric(metric) for g in kept] for j, name in enumerate(names)}, base)
            for metric in METRICS}}
        out[scenario] = cell
    return out


def two_nodes_verdict(summary: Mapping[str, Any]) -> dict[str, Any]:
    """'Two nodes serve more than one' (no target beyond it yet): the median new-claims
    ratio two_nodes / postgres of claims per second above 1."""
    figure = summary["new_claims"]["ratios"]["claims_per_s"][f"{TWO_NODES}/{PG}"]
    median = figure["median"]
    return {"claim": "two nodes serve more than one (new claims per second)",
            "median": median, "min": figure["min"], "max": figure["max"],
            "holds": None if median is None else median > 1.0}


def render(report: dict[str, Any]) -> str:
    def rng(s: Mapping[str, Any]) -> str:
        if s.get("median") is None:
            return "-"
        return f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"

    meta = report["meta"]
    lines = [f"claims on PostgreSQL and SQLite, two nodes and one ({meta['mode']}: "
             f"{meta['pairs']} repetition(s) of {meta['seconds']} s runs; "
             f"{meta['elapsed_s']:.0f} s)"]
    for phase, names in ((PHASE1, PHASE1_CONFIGS), (PHASE2, PHASE2_CONFIGS)):
        lines.append(f"{phase}:")
        lines.append(f"  {'scenario':<16} {'config':<18} {'claims/s':>9} {'/CPU-s':>8} "
                     f"{'/server CPU-s':>13} {'us CPU/claim':>12} {'batch':>6}")
        for scenario, cell in report[phase].items():
            for name in names:
                c = cell[name]
                lines.append(
                    f"  {scenario:<16} {name:<18} {c['claims_per_s']['median'] or 0:>9.0f} "
                    f"{c['claims_per_cpu_s']['median'] or 0:>8.0f} "
                    f"{c['claims_per_server_cpu_s']['median'] or 0:>13.0f} "
                    f"{c['cpu_us_per_claim']['median'] or 0:>12.0f} "
                    f"{c['mean_batch']['median'] or 0:>6.1f}")
            for metric in METRICS:
                for key, s in cell["ratios"][metric].items():
                    lines.append(f"    {key} {metric}: {rng(s)}")
    v = report["two_nodes_verdict"]
    verdict = {True: "yes", False: "NO", None: "not measured"}[v["holds"]]
    lines.append(f"{v['claim']}: median ratio {v['median']}: {verdict}")
    return "\n".join(lines)


def run(plan: Plan, out: Path | None, *, keep: bool = False, log: Log | None = None
        ) -> dict[str, Any]:
    say: Log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    work = Path(tempfile.mkdtemp(prefix="anon-ticket-nodes-"))
    started = time.perf_counter()
    bench = Bench(plan, work, say)
    meta: dict[str, Any] = {
        "mode": plan.mode, "pairs": plan.pairs, "seconds": plan.seconds,
        "connections": plan.connections,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": len(os.sched_getaffinity(0)), "loadavg_start": list(os.getloadavg()),
        "python": platform.python_version(), "wrk": wrk.wrk_version(),
        "pinning": "none: servers, PostgreSQL and wrk run on every core",
        "durability": {
            SQLITE: "journal_mode=WAL, synchronous=NORMAL (actors/storage.py): a COMMIT does "
                    "not fsync (the WAL is synced at checkpoints); a power loss may lose the "
                    "last transactions, never corrupts",
            PG: "synchronous_commit=on, fsync=on (the defaults): every COMMIT waits for its "
                "WAL flush",
            PG_SYNC_OFF: "ALTER DATABASE ... SET synchronous_commit = off: a COMMIT returns "
                         "before its WAL flush (the walwriter flushes it soon after); a crash "
                         "may lose the last transactions, never corrupts (SQLite's "
                         "durability here)",
            TWO_NODES: "as postgres (synchronous_commit=on)",
        },
        "order": f"{PHASE1}: per repetition, new_claims then already_claimed, each on "
                 f"{', '.join(PHASE1_CONFIGS)} back to back, the six orders in turn "
                 f"(run_order: {SQLITE} and {PG} swap every group); {PHASE2}: the same with "
                 f"{PG} and {TWO_NODES}, swapped every group",
        "notes": [
            "claims_per_s: answers of the scenario's kind (200 success for new_claims, 200 "
            "already_claimed for already_claimed) over wrk's duration (with two wrk "
            "processes: all their claims over the longer one's)",
            "server_cpu_s: utime + stime of each node's process tree (/proc/PID/stat before "
            "and after the run); db_cpu_s: PostgreSQL's CPU for the run's database: the "
            "backends of that database plus the server-wide processes (postmaster, "
            "walwriter, checkpointer, background writer, launchers), each with the time of "
            "the children it reaped (postgres_cpu.by_role; others_s: other databases' "
            "backends, i.e. idle nodes, left out); 0 on SQLite (in the server's process)",
            "claims_per_cpu_s: claims / (server_cpu_s + db_cpu_s), the comparison across "
            "databases; claims_per_server_cpu_s: the server alone",
            "ratios: X / base within each repetition (base: sqlite; postgres for two_nodes); "
            "median, min, max and every ratio",
            f"{PHASE2}: both sides driven by two wrk processes of {plan.connections // 2} "
            "connections (half the ids each); on two nodes one process a node; "
            "already_claimed asks each node for the ids the other claimed",
            "wal_bytes: pg_current_wal_lsn() over the run (the whole server); "
            "wal_syncs_approx: pg_stat_wal.wal_sync over the run (backends report it up to "
            "a second late)",
            "other_cpu_s: the machine's busy time over the run less the measured servers', "
            "PostgreSQL's (all of it), the idle servers' and wrk's; steal_s: the host's; "
            f"quiet_ratios: over the repetitions none of whose runs saw more than {QUIET} "
            f"cores of it (noise_by_rep); quiet_gates: before each group the run waited up "
            f"to {plan.quiet_wait} s ({plan.quiet_budget} s in all) for a half second with "
            f"at most {QUIET} cores of other load",
            "idle servers during a run: the other phase-1 configurations (phase 1), the "
            "other side (phase 2); sqlite and postgres_sync_off are stopped before phase 2 "
            "and the two nodes started",
        ],
    }
    bench.meta = meta
    results: dict[str, Any] = {}
    try:
        bench.prepare()
        bench.start(PHASE1_CONFIGS)
        bench.measure(PHASE1, PHASE1_CONFIGS, {n: 1 for n in PHASE1_CONFIGS})
        bench.stop([SQLITE, PG_SYNC_OFF])
        bench.start([TWO_NODES])
        bench.measure(PHASE2, PHASE2_CONFIGS, {n: 2 for n in PHASE2_CONFIGS})
        results[PHASE1] = phase_summary(bench.runs, PHASE1, PHASE1_CONFIGS)
        results[PHASE2] = phase_summary(bench.runs, PHASE2, PHASE2_CONFIGS)
        results["two_nodes_verdict"] = two_nodes_verdict(results[PHASE2])
        meta["postgres"]["checkpoints_at_end"] = bench._checkpoints()
    finally:
        bench.close()
        if keep:
            say(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    meta["loadavg_end"] = list(os.getloadavg())
    meta["elapsed_s"] = round(time.perf_counter() - started, 1)
    report = {"meta": meta, **results, "quiet_gates": bench.gates,
              "waited_for_quiet_s": round(sum(g["waited_s"] for g in bench.gates), 1),
              "runs": [r.as_dict() for r in bench.runs],
              "warmups": [r.as_dict() for r in bench.warmups]}
    if out is not None:
        out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.parser("python -m tests.bench.nodes", "claims on PostgreSQL against SQLite, and "
                   "two nodes against one on one PostgreSQL database", QUICK, "repetition")
    return cli.main(argv, p, lambda args, out: run(
        cli.plan_from(args, QUICK, FULL, "tickets"), out, keep=args.keep), render)


if __name__ == "__main__":
    sys.exit(main())
