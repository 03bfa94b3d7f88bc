"""Chaos on a real chain: the real server killed with SIGKILL at random moments, proven by
`db check` (I1, I3, I4 under fire).

While a chain thread keeps paying fresh integrated addresses (and topping some up, before and
after their claim) from the dev wallet and mining blocks, and redeem clients keep redeeming
every paid payment id, the main thread kills `anon-ticket serve` with SIGKILL at random
(seeded) moments, sometimes before it is even ready, and every `catch_up_every` kills while
it catches up on many blocks mined while it was down; it restarts it each time (the data
directory's lock must be free after a kill -9; /healthz must come back).

Every answer a client receives is checked on the fly (a token never changes, `success` comes
once per payment id, a balance never exceeds what was sent nor shrinks, a payment id once
redeemable never answers 404 again). At the end, with the server up and every payment deep:
every paid payment id redeems (or is already claimed) with the token a client saw, a second
redeem answers `already_claimed` with it, its balance and its token's amount equal what the
wallet sent to it, the database holds exactly the sent transfers (txid by txid), a SIGTERM
stops the server with exit 0, and `anon-ticket db check` exits 0.

    python -m tests.chaos --kills 1000 --out chaos.json   # its own chain, a JSON report

`run_chaos` is also what tests/e2e/test_chaos.py runs (short) against the session chain.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from anon_ticket.devchain import DevChainInfo
from anon_ticket.domain.address import integrated_address
from anon_ticket.domain.ids import PaymentId
from tests.chain import mine_sync, pay_sync, rpc_sync
from tests.harness import free_port
from tests.process.proc import ServerProcess, cli, kill, start_server

CONFS = 3
MIN_AMOUNT = 10_000_000_000  # the server's default --min-payment-amount (0.01 XMR)
CATCH_UP_BLOCKS = 40
READY_TIMEOUT = 120.0  # a loaded 2-core machine starts the server in 1-3 s, sometimes far more
FINAL_TIMEOUT = 240.0


@dataclass
class ChaosReport:
    seed: int
    kills_requested: int
    kills: int = 0  # SIGKILLs delivered to a live server
    kills_before_ready: int = 0  # of which before /healthz answered 200
    kills_during_catch_up: int = 0  # of which with the stored cursor short of the chain
    catch_ups: int = 0  # times many blocks were mined while the server was down
    restarts: int = 0
    payments: int = 0  # transfers sent from the dev wallet
    top_ups: int = 0  # of which to an already paid payment id
    top_ups_after_claim: int = 0  # of which to a payment id a client had already redeemed
    pids: int = 0
    blocks_mined: int = 0
    redeem_requests: int = 0
    redeems: int = 0  # 200 answers (success or already_claimed) a client received
    successes: int = 0
    final_successes: int = 0  # first claims made by the final check (no client had one)
    answers: dict[str, int] = field(default_factory=dict)  # outcome -> count during chaos
    lost: int = 0  # payments (txids) sent but not credited in the end
    doubled: int = 0  # credited more than sent, or a second `success` for one payment id
    mismatched: int = 0  # a payment id answered with a token other than the one seen first
    false_404: int = 0  # a redeemable payment id answered 404 later
    balance_regressions: int = 0
    db_check_ok: bool = False
    db_check: str = ""
    db_summary: dict[str, int] = field(default_factory=dict)
    clean_stop_exit: int | None = None
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    chaos_seconds: float = 0.0
    seconds_per_kill: float = 0.0
    stopped_early: str | None = None  # why fewer kills than requested (time budget)

    @property
    def ok(self) -> bool:
        return (self.lost == self.doubled == self.mismatched == self.false_404
                == self.balance_regressions == 0 and self.db_check_ok
                and self.clean_stop_exit == 0 and not self.problems)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "ok": self.ok}, indent=2, sort_keys=True) + "\n"


class _State:
    """What was sent and what clients were told; shared by the threads under one lock."""

    def __init__(self, report: ChaosReport) -> None:
        self.lock = threading.Lock()
        self.report = report
        self.sent: dict[str, list[tuple[str, int]]] = {}  # pid -> [(txid, amount)]
        self.order: list[str] = []
        self.token: dict[str, str] = {}  # pid -> the first token a client received
        self.successes: Counter[str] = Counter()
        # Ordering across two clients: an answer only contradicts one received before its
        # request was sent (monotonic clock), never one that merely overtook it.
        self.max_balance: dict[str, tuple[int, float]] = {}  # pid -> (balance, received at)
        self.redeemable: dict[str, float] = {}  # pid -> when its first 200 was received
        self.answers: Counter[str] = Counter()
        self.stop = threading.Event()
        self.errors: list[str] = []

    def problem(self, text: str) -> None:
        with self.lock:
            if len(self.report.problems) < 200:
                self.report.problems.append(text)

    def paid(self, pid: str) -> int:
        return sum(amount for _, amount in self.sent.get(pid, ()))

    def record(self, pid: str, sent_at: float, received_at: float, status: int,
               body: Any) -> None:
        """Check one answer a client received against everything known so far."""
        with self.lock:
            self.report.redeem_requests += 1
            if status == 200:
                outcome = body.get("status") if isinstance(body, dict) else None
                self.answers[str(outcome)] += 1
                if outcome not in ("success", "already_claimed"):
                    self._problem(f"{pid[:4]}…: 200 with {body!r}")
                    return
                token, balance = body.get("service_token"), body.get("balance")
                self.report.redeems += 1
                self.redeemable.setdefault(pid, received_at)
                if outcome == "success":
                    self.report.successes += 1
                    self.successes[pid] += 1
                    if self.successes[pid] > 1:
                        self.report.doubled += 1
                        self._problem(f"{pid[:4]}…: a second `success` (claimed twice)")
                first = self.token.setdefault(pid, token)
                if token != first:
                    self.report.mismatched += 1
                    self._problem(f"{pid[:4]}…: token {token[:8]}… after {first[:8]}…")
                if not isinstance(balance, int) or balance > self.paid(pid):
                    self.report.doubled += 1
                    self._problem(f"{pid[:4]}…: balance {balance} > sent {self.paid(pid)}")
                else:
                    best, seen_at = self.max_balance.get(pid, (0, 0.0))
                    if balance > best:
                        self.max_balance[pid] = (balance, received_at)
                    elif balance < best and sent_at > seen_at:
                        self.report.balance_regressions += 1
                        self._problem(f"{pid[:4]}…: balance {balance} after {best}")
            elif status == 404:
                self.answers["404"] += 1
                if pid in self.redeemable and sent_at > self.redeemable[pid]:
                    self.report.false_404 += 1
                    self._problem(f"{pid[:4]}…: 404 after it was redeemable")
            elif status == 503:
                self.answers["503"] += 1
            else:
                self.answers[str(status)] += 1
                self._problem(f"{pid[:4]}…: unexpected {status} {body!r}")

    def _problem(self, text: str) -> None:  # lock held
        if len(self.report.problems) < 200:
            self.report.problems.append(text)


def _post_redeem(client: httpx.Client, url: str, pid: str) -> tuple[int, Any] | None:
    """One redeem; None when the server could not be reached or did not answer."""
    try:
        resp = client.post(f"{url}/api/v1/redeem", json={"pid": pid})
    except httpx.TransportError:
        return None
    try:
        body = resp.json()
    except ValueError:
        body = resp.text[:200]
    return resp.status_code, body


def _timed_redeem(client: httpx.Client, url: str,
                  pid: str) -> tuple[float, float, int, Any] | None:
    sent_at = time.monotonic()
    answer = _post_redeem(client, url, pid)
    return None if answer is None else (sent_at, time.monotonic(), *answer)


class _Chain:
    """The dev wallet and the daemon, one call at a time (the chain thread and the main
    thread's catch-ups share them)."""

    def __init__(self, info: DevChainInfo, state: _State) -> None:
        self.info = info
        self.state = state
        self.lock = threading.Lock()

    def pay(self, pid: str, amount: int) -> None:
        address = integrated_address(self.info.primary_address, PaymentId.parse(pid))
        st = self.state
        with self.lock:  # recorded before any block (mined under this lock) can carry it
            txid = pay_sync(self.info, address, amount)
            with st.lock:
                if pid in st.sent:
                    st.report.top_ups += 1
                    st.report.top_ups_after_claim += pid in st.token
                else:
                    st.order.append(pid)
                    st.report.pids += 1
                st.report.payments += 1
                st.sent.setdefault(pid, []).append((txid, amount))

    def mine(self, n: int) -> int:
        with self.lock:
            count = mine_sync(self.info, n)
        with self.state.lock:
            self.state.report.blocks_mined += n
        return count

    def height(self) -> int:
        return int(rpc_sync(self.info.daemon_url, "get_block_count")["count"])


def _amount(rng: random.Random) -> int:
    return MIN_AMOUNT + rng.randrange(MIN_AMOUNT)


def _pick_pid(state: _State, rng: random.Random) -> str:
    """A fresh payment id mostly; a top-up of a paid one (claimed or not) a fifth of the time."""
    with state.lock:
        if state.order and rng.random() < 0.2:
            return rng.choice(state.order)
    return PaymentId.generate().hex()


def _chain_worker(chain: _Chain, state: _State, rng: random.Random) -> None:
    """Payments arriving all the time: 1-3 per block, a block every few hundred ms."""
    try:
        while not state.stop.is_set():
            for _ in range(rng.randint(1, 3)):
                chain.pay(_pick_pid(state, rng), _amount(rng))
            chain.mine(1)
            state.stop.wait(rng.uniform(0.0, 0.4))
    except Exception as exc:  # reported, ends the run
        state.errors.append(f"chain thread: {type(exc).__name__}: {exc}")
        state.stop.set()


def _redeem_worker(url: str, state: _State, rng: random.Random) -> None:
    """A client: redeems every paid payment id until it has a token, then now and then again."""
    try:
        with httpx.Client(trust_env=False, timeout=10) as client:
            while not state.stop.is_set():
                with state.lock:
                    pending = [p for p in state.order if p not in state.token]
                    claimed = [p for p in state.order if p in state.token]
                batch = pending + rng.sample(claimed, min(3, len(claimed)))
                rng.shuffle(batch)
                for pid in batch:
                    if state.stop.is_set():
                        return
                    answer = _timed_redeem(client, url, pid)
                    if answer is None:  # down (killed): try again shortly
                        state.stop.wait(0.05)
                        continue
                    state.record(pid, *answer)
                state.stop.wait(0.15)
    except Exception as exc:  # reported, ends the run
        state.errors.append(f"redeem thread: {type(exc).__name__}: {exc}")
        state.stop.set()


def _stored_cursor(data_dir: Path) -> int | None:
    conn = sqlite3.connect(f"{(data_dir / 'anon-ticket.db').resolve().as_uri()}?mode=ro",
                           uri=True)
    try:
        row = conn.execute("SELECT value FROM state WHERE key = 'cursor'").fetchone()
        return None if row is None else int(row[0])
    except sqlite3.Error:
        return None
    finally:
        conn.close()


def _stored_transfers(data_dir: Path) -> dict[str, dict[str, int]]:
    """pid -> {txid: amount} of the surviving transfers in the database."""
    conn = sqlite3.connect(f"{(data_dir / 'anon-ticket.db').resolve().as_uri()}?mode=ro",
                           uri=True)
    try:
        out: dict[str, dict[str, int]] = {}
        for pid, txid, amount in conn.execute(
                "SELECT pid, txid, amount FROM transfers WHERE vanished_at IS NULL"):
            out.setdefault(bytes(pid).hex(), {})[bytes(txid).hex()] = int(amount)
        return out
    finally:
        conn.close()


def _poller_status(server: ServerProcess) -> dict[str, Any] | None:
    try:
        with server.internal() as internal:
            resp = internal.get("/admin/status")
        if resp.status_code != 200:
            return None
        poller: dict[str, Any] | None = resp.json().get("poller")
        return poller
    except (httpx.TransportError, ValueError):
        return None


class _Runner:
    def __init__(self, workdir: Path, info: DevChainInfo, kills: int, seed: int,
                 max_seconds: float | None, catch_up_every: int) -> None:
        self.workdir = workdir
        self.info = info
        self.kills = kills
        self.rng = random.Random(seed)
        self.max_seconds = max_seconds
        self.catch_up_every = catch_up_every
        self.report = ChaosReport(seed=seed, kills_requested=kills)
        self.state = _State(self.report)
        self.chain = _Chain(info, self.state)
        self.data = workdir / "data"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.logs = workdir / "server-all.log"
        self.server: ServerProcess | None = None
        self.args: tuple[str, ...] = ()

    # --- the server --------------------------------------------------------------------

    def start(self, wait: bool = True) -> ServerProcess:
        assert self.server is None or self.server.proc.poll() is not None
        env = {"MONERO_RPC_URL": self.info.watch_wallet_url}
        self.server = start_server(self.data, port=self.port, env=env, args=self.args,
                                   wait=False)
        self.report.restarts += 1
        if wait:
            self.wait_ready()
        return self.server

    def wait_ready(self) -> None:
        assert self.server is not None
        try:
            self.server.wait_ready(timeout=READY_TIMEOUT)  # raises if it exits (a held lock)
        except AssertionError:
            self._keep_log()
            raise

    def _keep_log(self) -> None:
        """start_server writes one log per port, overwritten at each start: keep them all."""
        assert self.server is not None
        with self.logs.open("a") as out:
            out.write(f"\n=== server pid {self.server.proc.pid} "
                      f"(exit {self.server.proc.poll()}) ===\n")
            try:
                out.write(self.server.log())
            except OSError as exc:
                out.write(f"(no log: {exc})\n")

    def kill(self) -> None:
        assert self.server is not None
        if self.server.proc.poll() is not None:  # died by itself: that is a finding
            self._keep_log()
            raise AssertionError(f"the server exited {self.server.proc.returncode} before "
                                 f"the kill:\n{self.server.log()[-4000:]}")
        kill(self.server)
        self.report.kills += 1
        self._keep_log()

    # --- chaos ---------------------------------------------------------------------------

    def _over_budget(self, started: float) -> bool:
        if self.max_seconds is not None and time.monotonic() - started > self.max_seconds:
            self.report.stopped_early = (f"time budget of {self.max_seconds:.0f} s reached "
                                         f"after {self.report.kills} kills")
            return True
        return False

    def _check_threads(self) -> None:
        if self.state.errors:
            raise AssertionError("; ".join(self.state.errors))

    def plain_kill(self) -> None:
        """Up (or starting): a random moment, then SIGKILL."""
        if self.rng.random() < 0.15:  # sometimes while it starts, before it is ready
            if self.server is None or self.server.proc.poll() is not None:
                self.start(wait=False)
            time.sleep(self.rng.uniform(0.0, 1.5))
            ready = self._healthy()
            self.kill()
            self.report.kills_before_ready += not ready
            return
        if self.server is None or self.server.proc.poll() is not None:
            self.start()
        time.sleep(self.rng.uniform(0.0, 2.5))
        self.kill()

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def catch_up_kill(self) -> None:
        """Down: payments and many blocks arrive; up again: SIGKILL at a random height of its
        catch-up (the cursor stored at the kill proves it was short of the chain)."""
        if self.server is not None and self.server.proc.poll() is None:
            time.sleep(self.rng.uniform(0.0, 1.0))
            self.kill()
        for _attempt in range(4):
            self.report.catch_ups += 1
            left = CATCH_UP_BLOCKS
            while left > 0:  # payments spread over the blocks mined while it is down
                for _ in range(self.rng.randint(0, 2)):
                    self.chain.pay(_pick_pid(self.state, self.rng), _amount(self.rng))
                n = min(left, self.rng.randint(5, 15))
                self.chain.mine(n)
                left -= n
            target = self.chain.height() - CONFS
            server = self.start(wait=False)
            deadline = time.monotonic() + READY_TIMEOUT
            kill_at: int | None = None
            with server.internal() as internal:
                while True:
                    try:
                        status = internal.get("/admin/status").json().get("poller") or {}
                    except (httpx.TransportError, ValueError):
                        status = {}
                    cursor = status.get("cursor")
                    if cursor is not None and kill_at is None:  # the catch-up has begun
                        kill_at = self.rng.randint(cursor, max(cursor, target - 1))
                    if cursor is not None and kill_at is not None and cursor >= kill_at:
                        break
                    if server.proc.poll() is not None or time.monotonic() > deadline:
                        self._keep_log()
                        raise AssertionError(f"no catch-up after a restart ({status}):\n"
                                             f"{server.log()[-4000:]}")
                    time.sleep(0.005)
            self.kill()
            stored = _stored_cursor(self.data)
            if stored is not None and stored < target:
                self.report.kills_during_catch_up += 1
                return
        self.state.problem("no kill landed during a catch-up in 4 tries")

    def chaos(self) -> None:
        self.args = ("--min-confirmations", str(CONFS), "--poll-interval-secs", "0.1",
                     "--scan-window-blocks", "1", "--start-height", str(self.chain.height()),
                     "--primary-address", self.info.primary_address,
                     "--backoff-initial-secs", "0.05", "--backoff-max-secs", "0.5")
        started = time.monotonic()
        self.start()
        threads = [threading.Thread(target=_chain_worker, name="chaos-chain",
                                    args=(self.chain, self.state,
                                          random.Random(self.rng.random())))]
        threads += [threading.Thread(target=_redeem_worker, name=f"chaos-redeem-{i}",
                                     args=(self.url, self.state,
                                           random.Random(self.rng.random())))
                    for i in range(2)]
        for t in threads:
            t.start()
        try:
            while self.report.kills < self.kills:
                self._check_threads()
                if self._over_budget(started):
                    break
                n = self.report.kills
                # the second kill is a catch-up one, so that a short run has one too
                if n == 1 or (self.catch_up_every and n % self.catch_up_every == 1):
                    self.catch_up_kill()
                else:
                    self.plain_kill()
        finally:
            self.state.stop.set()
            for t in threads:
                t.join(180)
        self._check_threads()
        self.report.chaos_seconds = round(time.monotonic() - started, 1)
        self.report.seconds_per_kill = round(self.report.chaos_seconds
                                             / max(1, self.report.kills), 2)

    # --- the proof ------------------------------------------------------------------------

    def verify(self) -> None:
        st, report = self.state, self.report
        count = self.chain.mine(CONFS + 1)  # every payment deep enough
        if self.server is None or self.server.proc.poll() is not None:
            self.start()
        else:
            self.wait_ready()
        server = self.server
        assert server is not None
        target = count - CONFS
        deadline = time.monotonic() + FINAL_TIMEOUT
        while True:
            status = _poller_status(server)
            if status is not None and (status.get("cursor") or -1) >= target:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"the poller did not reach {target}: {status}")
            time.sleep(0.1)
        stored = _stored_transfers(self.data)
        with httpx.Client(trust_env=False, timeout=10) as client:
            for pid in st.order:
                sent = dict(st.sent[pid])
                paid = sum(sent.values())
                credited = stored.get(pid, {})
                missing = [t for t in sent if t not in credited]
                extra = [t for t in credited if t not in sent]
                wrong = [t for t in sent if t in credited and credited[t] != sent[t]]
                if missing:
                    report.lost += len(missing)
                    for txid in missing:
                        st.problem(f"{pid[:4]}…: transfer {txid[:8]}… not credited "
                                   f"({self._where(txid)})")
                if extra or wrong:
                    report.doubled += len(extra) + len(wrong)
                    st.problem(f"{pid[:4]}…: credited transfers not sent: {len(extra)}, "
                               f"with the wrong amount: {len(wrong)}")
                first = self._final_redeem(client, pid, deadline)
                if first is None:
                    report.lost += 0 if missing else 1
                    st.problem(f"{pid[:4]}…: never redeemable")
                    continue
                token, balance = first["service_token"], first["balance"]
                if pid in st.token and token != st.token[pid]:
                    report.mismatched += 1
                    st.problem(f"{pid[:4]}…: final token {token[:8]}… != seen "
                               f"{st.token[pid][:8]}…")
                if balance < paid and not missing:
                    report.lost += 1
                    st.problem(f"{pid[:4]}…: balance {balance} < sent {paid}")
                elif balance > paid:
                    report.doubled += 1
                    st.problem(f"{pid[:4]}…: balance {balance} > sent {paid}")
                again = _post_redeem(client, self.url, pid)
                if again is None or again[0] != 200 or again[1] != {
                        "status": "already_claimed", "service_token": token,
                        "balance": balance}:
                    report.mismatched += 1
                    st.problem(f"{pid[:4]}…: second redeem answered {again!r}")
                view = client.get(f"{self.url}/api/v1/token/{token}")
                body = view.json() if view.status_code == 200 else {}
                if body.get("status") != "active" or body.get("amount") != paid:
                    st.problem(f"{pid[:4]}…: token view {view.status_code} {body!r}, "
                               f"sent {paid}")
        server.stop()  # SIGTERM: a clean stop after all that
        report.clean_stop_exit = server.proc.returncode
        self._keep_log()
        check = cli(self.data, "db", "check", "--json")
        report.db_check = (check.stdout + check.stderr)[-4000:]
        report.db_check_ok = check.returncode == 0
        try:
            report.db_summary = json.loads(check.stdout.rsplit("}", 1)[0] + "}")
        except ValueError:
            st.problem("db check printed no summary")
        if report.db_check_ok and report.db_summary.get("transfers", -1) < report.payments:
            st.problem(f"db check counts {report.db_summary.get('transfers')} transfers, "
                       f"{report.payments} were sent")

    def _final_redeem(self, client: httpx.Client, pid: str,
                      deadline: float) -> dict[str, Any] | None:
        while time.monotonic() < deadline:
            answer = _post_redeem(client, self.url, pid)
            if answer is not None and answer[0] == 200 and isinstance(answer[1], dict):
                body: dict[str, Any] = answer[1]
                if body.get("status") == "success":
                    self.report.final_successes += 1
                    self.state.successes[pid] += 1
                    if self.state.successes[pid] > 1:
                        self.report.doubled += 1
                        self.state.problem(f"{pid[:4]}…: a second `success` at the end")
                return body
            if answer is not None and answer[0] not in (404, 503):
                self.state.problem(f"{pid[:4]}…: final redeem answered {answer!r}")
                return None
            time.sleep(0.1)
        return None

    def _where(self, txid: str) -> str:
        """For a lost transfer: what the dev wallet knows of it (mined? how deep?)."""
        try:
            found = rpc_sync(self.info.dev_wallet_url, "get_transfer_by_txid", {"txid": txid})
            t = found.get("transfer", {})
            return f"wallet: type {t.get('type')}, height {t.get('height')}, " \
                   f"confirmations {t.get('confirmations')}"
        except Exception as exc:  # a diagnostic only
            return f"wallet: {exc}"

    def cleanup(self) -> None:
        if self.server is not None and self.server.proc.poll() is None:
            kill(self.server)


def run_chaos(workdir: Path, chain: DevChainInfo, kills: int, seed: int, *,
              max_seconds: float | None = None, catch_up_every: int = 10) -> ChaosReport:
    """Kill the real server `kills` times (SIGKILL, random moments, some mid catch-up) while
    payments and redeems run on `chain`; then prove nothing was lost or doubled. Stops early
    (saying so in the report) once `max_seconds` of chaos have passed. No server is left
    running when it returns or raises."""
    if (workdir / "data").exists():
        raise ValueError(f"{workdir / 'data'} exists: chaos needs a fresh data directory")
    workdir.mkdir(parents=True, exist_ok=True)
    runner = _Runner(workdir, chain, kills, seed, max_seconds, catch_up_every)
    began = time.monotonic()
    try:
        runner.chaos()
        runner.verify()
    except Exception as exc:  # a finding: the report says it, `ok` is False
        runner.state.problem(f"run aborted: {type(exc).__name__}: {exc}"[:6000])
    finally:
        runner.cleanup()
        runner.report.answers = dict(runner.state.answers)
        runner.report.seconds = round(time.monotonic() - began, 1)
    return runner.report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("chaos.json"))
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop the chaos after this long (the report says so)")
    parser.add_argument("--catch-up-every", type=int, default=10)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="chain, data directory and server logs (default: a temp dir)")
    args = parser.parse_args(argv)

    import trio

    from anon_ticket.devchain import DevChain, plan_ports

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="anon-ticket-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    chain = DevChain(workdir / "devchain", plan_ports())
    procs = chain.spawn()  # from the main thread (PR_SET_PDEATHSIG)
    report: ChaosReport | None = None
    try:
        info = trio.run(chain.bootstrap)
        budget = None if args.max_minutes is None else args.max_minutes * 60
        report = run_chaos(workdir / f"run-{args.seed}-{int(time.time())}", info, args.kills,
                           args.seed, max_seconds=budget, catch_up_every=args.catch_up_every)
    finally:
        chain.terminate(procs)
    args.out.write_text(report.to_json())
    print(report.to_json(), end="")
    print(f"workdir: {workdir}", file=sys.stderr)
    return 0 if report.ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
