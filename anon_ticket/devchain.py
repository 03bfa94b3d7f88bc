"""A private Monero regtest chain for development and tests: processes and bootstrap.

Three child processes live under one root directory:

- `monerod --regtest --offline --fixed-difficulty 1 --keep-fakechain` (the chain survives a
  restart; without `--keep-fakechain` regtest wipes it at start),
- a `monero-wallet-rpc` with the funded `dev` wallet (it pays and mines),
- a `monero-wallet-rpc` with ONLY the watch-only `receiver-watch` wallet open: the operator's
  wallet, the one the service's poller talks to.

Layout: `daemon/` (chain), `wallets/`, `ringdb/`, `logs/` (each child's stdout and its own
log), `pids/` (one PID file per child) and, once the chain is ready, `devchain.json` (mode
0600): URLs, addresses and the view key. It is removed on a clean stop.

Children get their own session (a Ctrl-C in the terminal reaches only us, and we stop the
wallets first so they save). They die with their parent even when it is killed with SIGKILL:
a small reaper process started before them (`anon_ticket/devreap.py`, with
`PR_SET_PDEATHSIG` = SIGTERM) then stops them in the same order, SIGKILL after a grace.
PDEATHSIG fires when the *thread* that forked exits, which is why `DevChain.spawn` forks from
the main thread and never from a worker thread.

Timings on a 2-core machine: from nothing to a funded dev wallet ~11 s (99 blocks mined,
RandomX initialisation ~2.5 s); a restart on existing files ~3-5 s.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import asdict, dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import trio
from monero.seed import Seed

from anon_ticket.children import die_with_parent
from anon_ticket.devreap import DAEMON, DAEMON_BIN, WALLET_BIN, reap
from anon_ticket.errors import ConfigError, InvalidInput, RpcCallError, RpcError
from anon_ticket.logs import get_logger
from anon_ticket.walletrpc import WATCH_ONLY, JsonRpc

log = get_logger("devchain")

HOST = "127.0.0.1"
INFO_FILE = "devchain.json"
DEV_WALLET = "dev"
RECEIVER_WALLET = "receiver"
WATCH_WALLET = "receiver-watch"
# The chain height (block count) bootstrap mines up to. Coinbase unlocks after 60 blocks and a
# transfer needs 16 unlocked outputs (ring size 16): 75 blocks would do for that. But
# monero-wallet-rpc 0.18.0.0 (Debian 12) has an infinite loop in decoy selection (fixed upstream
# in monero PR #8794, 0.18.2.2): it asks the daemon for 75 outputs, and when the chain holds
# about 76 spendable ones (outputs of blocks at least 10 deep; at height 86 with coinbase only)
# the gamma picker can never reach the last one and `transfer` spins forever at 100 % CPU.
# Starting at height 100 keeps the chain past that count for good (it only grows); `pay`
# mines back up to it when blocks were popped.
SPEND_HEIGHT = 100
TOP_UP_BLOCKS = 10
START_DEADLINE = 90.0
ATOMIC_PER_XMR = 10**12
MAX_ATOMIC = 2**64 - 1
# Child names: PID files are pids/<name>.pid, logs logs/<name>.stdout and logs/<name>.log.
WALLET_DEV = "wallet-dev"
WALLET_WATCH = "wallet-watch"

# --- ports and the info file --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DevChainPorts:
    daemon: int
    dev_wallet: int
    watch_wallet: int


def plan_ports() -> DevChainPorts:
    """Three free loopback ports (bound to port 0 together, read back, released)."""
    socks = [socket.socket() for _ in range(3)]
    try:
        for s in socks:
            s.bind((HOST, 0))
        daemon, dev, watch = (int(s.getsockname()[1]) for s in socks)
    finally:
        for s in socks:
            s.close()
    return DevChainPorts(daemon=daemon, dev_wallet=dev, watch_wallet=watch)


def _url(port: int) -> str:
    return f"http://{HOST}:{port}/json_rpc"


@dataclass(frozen=True, slots=True)
class DevChainInfo:
    root: Path
    ports: DevChainPorts
    daemon_url: str
    dev_wallet_url: str
    watch_wallet_url: str
    dev_address: str
    primary_address: str
    view_key: str

    def to_json(self) -> str:
        data = asdict(self)
        data["root"] = str(self.root)
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> DevChainInfo:
        try:
            data = json.loads(text)
            ports = data["ports"]
            return cls(
                root=Path(str(data["root"])),
                ports=DevChainPorts(daemon=int(ports["daemon"]),
                                    dev_wallet=int(ports["dev_wallet"]),
                                    watch_wallet=int(ports["watch_wallet"])),
                daemon_url=str(data["daemon_url"]),
                dev_wallet_url=str(data["dev_wallet_url"]),
                watch_wallet_url=str(data["watch_wallet_url"]),
                dev_address=str(data["dev_address"]),
                primary_address=str(data["primary_address"]),
                view_key=str(data["view_key"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"not a dev chain info file ({type(exc).__name__}: {exc})") from None

    @classmethod
    def from_file(cls, path: Path) -> DevChainInfo:
        return cls.from_json(Path(path).read_text())

    def write(self, path: Path) -> None:
        """Write atomically with mode 0600."""
        tmp = path.with_name(f".{path.name}.tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


# --- amounts ---------------------------------------------------------------------------------

_XMR_RE = re.compile(r"(\d+)(?:\.(\d{1,12}))?")


def xmr_to_atomic(text: str) -> int:
    """A positive decimal XMR amount ("1.5", "0.000000000001") in atomic units, exactly."""
    if not isinstance(text, str):
        raise InvalidInput("amount must be a string like 1.5")
    m = _XMR_RE.fullmatch(text.strip())
    if m is None:
        raise InvalidInput(
            f"invalid amount {text[:40]!r}: expected a decimal XMR amount like 1.5 "
            "(at most 12 digits after the point)")
    atomic = int(Decimal(text.strip()) * ATOMIC_PER_XMR)
    if atomic <= 0:
        raise InvalidInput("invalid amount: must be greater than zero")
    if atomic > MAX_ATOMIC:
        raise InvalidInput("invalid amount: too large")
    return atomic


# --- processes ---------------------------------------------------------------------------------


def _tail(path: Path, lines: int = 20) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            data = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


def _child_name(proc: subprocess.Popen[bytes], names: dict[int, str]) -> str:
    return names.get(proc.pid, f"pid {proc.pid}")


def _is_wallet(proc: subprocess.Popen[bytes]) -> bool:
    args = proc.args
    first = args[0] if isinstance(args, list | tuple) else str(args).split()[0]
    return Path(str(first)).name == WALLET_BIN


class DevChain:
    """The processes and files of one dev chain under `root`."""

    def __init__(self, root: Path, ports: DevChainPorts) -> None:
        self.root = Path(root).resolve()
        self.ports = ports
        self.daemon_dir = self.root / "daemon"
        self.wallet_dir = self.root / "wallets"
        self.ringdb_dir = self.root / "ringdb"
        self.log_dir = self.root / "logs"
        self.pid_dir = self.root / "pids"
        self.info_path = self.root / INFO_FILE
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self._names: dict[int, str] = {}
        self._reaper: subprocess.Popen[bytes] | None = None

    @property
    def daemon_url(self) -> str:
        return _url(self.ports.daemon)

    @property
    def dev_wallet_url(self) -> str:
        return _url(self.ports.dev_wallet)

    @property
    def watch_wallet_url(self) -> str:
        return _url(self.ports.watch_wallet)

    def name_of(self, proc: subprocess.Popen[bytes]) -> str:
        return _child_name(proc, self._names)

    # --- leftovers ---------------------------------------------------------------------------

    def reap_leftovers(self, wait: float = 10.0) -> None:
        """Stop children a previous run left behind (its reaper killed too, or a crash while
        stopping), by their PID files, as the reaper would: anon_ticket/devreap.py."""

        def say(event: str, child: str, pid: int) -> None:
            if event == "stopping":
                log.warning("stopping leftover child", child=child, os_pid=pid)
            else:
                log.warning("leftover child ignored SIGTERM, SIGKILL", os_pid=pid)

        reap(self.root, wallet_grace=wait, daemon_grace=wait, say=say)
        # LMDB re-initialises a lock file nobody holds: daemon/fake/lmdb/lock.mdb stays.

    def remove_info(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.info_path.unlink()

    # --- spawning ----------------------------------------------------------------------------

    def _commands(self) -> dict[str, list[str]]:
        daemon = [
            DAEMON_BIN, "--regtest", "--offline", "--fixed-difficulty", "1", "--keep-fakechain",
            "--non-interactive", "--data-dir", str(self.daemon_dir),
            "--rpc-bind-ip", HOST, "--rpc-bind-port", str(self.ports.daemon),
            "--rpc-ssl", "disabled", "--p2p-bind-ip", HOST, "--no-zmq", "--no-igd",
            "--hide-my-port", "--disable-dns-checkpoints", "--check-updates", "disabled",
            "--disable-rpc-ban", "--log-level", "0",
            "--log-file", str(self.log_dir / f"{DAEMON}.log"), "--max-log-files", "1",
        ]

        def wallet(name: str, port: int) -> list[str]:
            return [
                WALLET_BIN, "--daemon-address", f"{HOST}:{self.ports.daemon}",
                "--trusted-daemon", "--daemon-ssl", "disabled", "--rpc-ssl", "disabled",
                "--rpc-bind-ip", HOST, "--rpc-bind-port", str(port), "--disable-rpc-login",
                "--disable-rpc-ban", "--wallet-dir", str(self.wallet_dir),
                "--shared-ringdb-dir", str(self.ringdb_dir), "--no-dns", "--non-interactive",
                "--log-level", "0", "--log-file", str(self.log_dir / f"{name}.log"),
                "--max-log-files", "1",
            ]

        return {
            DAEMON: daemon,
            WALLET_DEV: wallet(WALLET_DEV, self.ports.dev_wallet),
            WALLET_WATCH: wallet(WALLET_WATCH, self.ports.watch_wallet),
        }

    def spawn(self) -> list[subprocess.Popen[bytes]]:
        """Start monerod and the two wallet-rpcs. Call from the main thread (PDEATHSIG)."""
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("DevChain.spawn must run in the main thread (PR_SET_PDEATHSIG "
                               "fires when the forking thread exits)")
        missing = [b for b in (DAEMON_BIN, WALLET_BIN) if shutil.which(b) is None]
        if missing:
            raise ConfigError([f"--dev-chain needs {b} on PATH (Debian: apt-get install monero)"
                               for b in missing])
        for d in (self.daemon_dir, self.wallet_dir, self.ringdb_dir, self.log_dir, self.pid_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)
        # The reaper first: from the moment a child has a PID file, a death of this process
        # stops it (anon_ticket/devreap.py). The children themselves get no death signal: one
        # to each would stop them all at once, not the wallets first.
        self._reaper = subprocess.Popen(
            [sys.executable, "-m", "anon_ticket.devreap", str(self.root)],
            stdin=subprocess.DEVNULL, start_new_session=True, close_fds=True,
            preexec_fn=die_with_parent(signal.SIGTERM))
        started: list[subprocess.Popen[bytes]] = []
        try:
            for name, argv in self._commands().items():
                out = (self.log_dir / f"{name}.stdout").open("ab")
                try:
                    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                    out.write(f"--- {stamp} started by pid {os.getpid()}\n".encode())
                    out.flush()
                    proc = subprocess.Popen(
                        argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                        cwd=self.root, start_new_session=True, close_fds=True)
                finally:
                    out.close()
                started.append(proc)
                self.children[name] = proc
                self._names[proc.pid] = name
                (self.pid_dir / f"{name}.pid").write_text(f"{proc.pid}\n")
                log.debug("child started", child=name, os_pid=proc.pid)
        except BaseException:
            self.terminate(started, grace=5.0)
            raise
        return started

    # --- stopping ----------------------------------------------------------------------------

    def terminate(self, procs: Iterable[subprocess.Popen[bytes]], grace: float = 20.0) -> None:
        """Stop the children: the wallets first with SIGTERM (they save), then monerod;
        SIGKILL after `grace` seconds; remove their PID files. Blocking."""
        procs = list(procs)
        wallets = [p for p in procs if _is_wallet(p)]
        others = [p for p in procs if not _is_wallet(p)]
        for group in (wallets, others):
            for p in group:
                if p.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        p.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace
            for p in group:
                try:
                    p.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.warning("child ignored SIGTERM, SIGKILL", child=self.name_of(p),
                                os_pid=p.pid, grace=grace)
                    p.kill()
                    p.wait()
            for p in group:
                name = self._names.pop(p.pid, None)
                if name is not None:
                    self.children.pop(name, None)
                    with contextlib.suppress(FileNotFoundError):
                        (self.pid_dir / f"{name}.pid").unlink()
                log.debug("child stopped", child=name or p.pid, returncode=p.returncode)
        if not self.children:
            self.remove_info()  # the chain is down: devchain.json no longer describes it
            self._stand_down_reaper()

    def _stand_down_reaper(self) -> None:
        reaper, self._reaper = self._reaper, None
        if reaper is not None and reaper.poll() is None:
            reaper.send_signal(signal.SIGUSR1)  # stopped cleanly: nothing to reap
            try:
                reaper.wait(timeout=5)
            except subprocess.TimeoutExpired:
                reaper.kill()
                reaper.wait()

    # --- bootstrap ---------------------------------------------------------------------------

    def _check_children(self) -> None:
        for name, proc in self.children.items():
            code = proc.poll()
            if code is not None:
                tail = _tail(self.log_dir / f"{name}.stdout") or _tail(
                    self.log_dir / f"{name}.log")
                raise RuntimeError(f"dev chain: {name} exited with code {code} during start; "
                                   f"logs in {self.log_dir}; last lines:\n{tail}")

    async def _wait_rpc(self, rpc: JsonRpc, method: str, name: str, deadline: float) -> None:
        while True:
            self._check_children()
            try:
                await rpc.call(method, timeout=2.0)
                return
            except RpcError:
                pass
            if trio.current_time() > deadline:
                raise RuntimeError(f"dev chain: {name} RPC at {rpc.url} not answering after "
                                   f"{START_DEADLINE:g}s; logs in {self.log_dir}")
            await trio.sleep(0.1)

    def _has_wallet(self, name: str) -> bool:
        return (self.wallet_dir / f"{name}.keys").exists()

    async def _setup_dev(self, dev: JsonRpc, daemon: JsonRpc, out: dict[str, str]) -> None:
        if self._has_wallet(DEV_WALLET):
            await dev.call("open_wallet", {"filename": DEV_WALLET, "password": ""})
            out["dev_address"] = await _address(dev)
            await self._mine_initial(daemon, out["dev_address"])
            return
        # A fresh dev wallet: draw its keys here, so mining (RandomX start-up included) runs
        # while wallet-rpc creates the wallet (it generates an RSA certificate first, 1-4 s).
        seed = Seed()
        address = str(seed.public_address())
        self._drop_partial(DEV_WALLET)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._mine_initial, daemon, address)
            nursery.start_soon(dev.call, "generate_from_keys", {
                "filename": DEV_WALLET, "address": address,
                "spendkey": str(seed.secret_spend_key()), "viewkey": str(seed.secret_view_key()),
                "password": "", "restore_height": 0, "autosave_current": True,
            })
        out["dev_address"] = await _address(dev)
        if out["dev_address"] != address:
            raise RuntimeError("dev chain: the dev wallet's address is not the one its keys make")

    async def _mine_initial(self, daemon: JsonRpc, address: str) -> None:
        count = await _block_count(daemon)
        if count < SPEND_HEIGHT:
            t0 = trio.current_time()
            await _generate(daemon, SPEND_HEIGHT - count, address)
            log.info("mined initial blocks", blocks=SPEND_HEIGHT - count,
                     seconds=round(trio.current_time() - t0, 2))

    async def _setup_watch(self, watch: JsonRpc, out: dict[str, str]) -> None:
        if self._has_wallet(WATCH_WALLET):
            await watch.call("open_wallet", {"filename": WATCH_WALLET, "password": ""})
        else:
            if self._has_wallet(RECEIVER_WALLET):
                await watch.call("open_wallet", {"filename": RECEIVER_WALLET, "password": ""})
            else:
                self._drop_partial(RECEIVER_WALLET)
                await watch.call("create_wallet", {"filename": RECEIVER_WALLET, "password": "",
                                                   "language": "English"})
            address = await _address(watch)
            view_key = await _query_key(watch, "view_key")
            await watch.call("close_wallet")
            self._drop_partial(WATCH_WALLET)
            await watch.call("generate_from_keys", {
                "filename": WATCH_WALLET, "address": address, "viewkey": view_key,
                "password": "", "restore_height": 0, "autosave_current": True,
            })
        out["primary_address"] = await _address(watch)
        out["view_key"] = await _query_key(watch, "view_key")
        try:
            await watch.call("query_key", {"key_type": "spend_key"})
        except RpcCallError as exc:
            if exc.code != WATCH_ONLY:
                raise
        else:
            raise RuntimeError(f"dev chain: wallet {WATCH_WALLET} is not watch-only")

    def _drop_partial(self, name: str) -> None:
        """A wallet cache without its keys file (a crash during creation) blocks re-creation."""
        for suffix in ("", ".address.txt"):
            with contextlib.suppress(FileNotFoundError):
                (self.wallet_dir / f"{name}{suffix}").unlink()

    async def bootstrap(self) -> DevChainInfo:
        """Wait for the three RPCs, create or open the wallets, fund the dev wallet, write
        devchain.json. Idempotent: a restart on existing files reuses chain and wallets."""
        t0 = trio.current_time()
        self.remove_info()
        deadline = t0 + START_DEADLINE
        async with _rpc(self.daemon_url) as daemon, _rpc(self.dev_wallet_url) as dev, \
                _rpc(self.watch_wallet_url) as watch:
            await self._wait_rpc(daemon, "get_block_count", DAEMON, deadline)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._wait_rpc, dev, "get_version", WALLET_DEV, deadline)
                nursery.start_soon(self._wait_rpc, watch, "get_version", WALLET_WATCH, deadline)
            log.info("dev chain processes up", seconds=round(trio.current_time() - t0, 2))
            found: dict[str, str] = {}
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._setup_dev, dev, daemon, found)
                nursery.start_soon(self._setup_watch, watch, found)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(dev.call, "refresh")
                nursery.start_soon(watch.call, "refresh")
            if await _unlocked(dev) == 0:
                log.warning("dev wallet has no unlocked balance, mining more")
                await _generate(daemon, SPEND_HEIGHT, found["dev_address"])
                await dev.call("refresh")
                if await _unlocked(dev) == 0:
                    raise RuntimeError("dev chain: the dev wallet has no unlocked balance")
            height = await _block_count(daemon)
        info = DevChainInfo(
            root=self.root, ports=self.ports, daemon_url=self.daemon_url,
            dev_wallet_url=self.dev_wallet_url, watch_wallet_url=self.watch_wallet_url,
            dev_address=found["dev_address"], primary_address=found["primary_address"],
            view_key=found["view_key"])
        info.write(self.info_path)
        log.info("dev chain ready", height=height, seconds=round(trio.current_time() - t0, 2))
        return info


# --- RPC helpers -----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _rpc(url: str) -> AsyncIterator[JsonRpc]:
    rpc = JsonRpc(url)
    try:
        yield rpc
    finally:
        with trio.CancelScope(shield=True):
            await rpc.aclose()


def _field(result: dict[str, Any], key: str, kind: type[Any], method: str) -> Any:
    value = result.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise RpcError(f"{method}: answer has no {kind.__name__} {key!r}")
    return value


async def _address(wallet: JsonRpc) -> str:
    result = await wallet.call("get_address", {"account_index": 0})
    return str(_field(result, "address", str, "get_address"))


async def _query_key(wallet: JsonRpc, key_type: str) -> str:
    result = await wallet.call("query_key", {"key_type": key_type})
    return str(_field(result, "key", str, "query_key"))


async def _block_count(daemon: JsonRpc) -> int:
    return int(_field(await daemon.call("get_block_count"), "count", int, "get_block_count"))


async def _unlocked(wallet: JsonRpc) -> int:
    result = await wallet.call("get_balance", {"account_index": 0})
    return int(_field(result, "unlocked_balance", int, "get_balance"))


async def _generate(daemon: JsonRpc, n: int, address: str) -> int:
    result = await daemon.call("generateblocks",
                               {"amount_of_blocks": n, "wallet_address": address})
    return int(_field(result, "height", int, "generateblocks")) + 1


def _not_enough_unlocked(exc: RpcCallError) -> bool:
    text = exc.rpc_message.lower()
    return "not enough unlocked" in text or "not enough outputs" in text


async def pay(info: DevChainInfo, address: str, amount_atomic: int) -> str:
    """Send `amount_atomic` from the dev wallet to `address` (priority 0); return the txid.
    Below SPEND_HEIGHT (blocks popped) it first mines up to it; short of unlocked money, it
    mines 10 blocks to the dev wallet and tries once more."""
    if amount_atomic <= 0:
        raise InvalidInput("amount must be positive")
    params = {"destinations": [{"amount": amount_atomic, "address": address}], "priority": 0,
              "get_tx_key": False}
    async with _rpc(info.dev_wallet_url) as dev, _rpc(info.daemon_url) as daemon:
        count = await _block_count(daemon)
        if count < SPEND_HEIGHT:
            await _generate(daemon, SPEND_HEIGHT - count, info.dev_address)
        await dev.call("refresh")
        try:
            result = await dev.call("transfer", params)
        except RpcCallError as exc:
            if not _not_enough_unlocked(exc):
                raise
            log.info("dev wallet short of unlocked money, mining", blocks=TOP_UP_BLOCKS)
            await _generate(daemon, TOP_UP_BLOCKS, info.dev_address)
            await dev.call("refresh")
            result = await dev.call("transfer", params)
    return str(_field(result, "tx_hash", str, "transfer"))


async def mine(info: DevChainInfo, n: int, to: str | None = None) -> int:
    """Mine `n` blocks (to the dev wallet unless `to`); return the chain height afterwards,
    counted like the daemon's get_block_count and the wallet's get_height."""
    if n <= 0:
        raise InvalidInput("number of blocks must be positive")
    async with _rpc(info.daemon_url) as daemon:
        return await _generate(daemon, n, to or info.dev_address)


async def pop_blocks(info: DevChainInfo, n: int) -> int:
    """Remove the top `n` blocks (their transactions return to the pool); return the height."""
    async with _rpc(info.daemon_url) as daemon:
        result = await daemon.post_path("/pop_blocks", {"nblocks": n})
        if result.get("status") != "OK":
            raise RpcError(f"/pop_blocks: status {result.get('status')!r}")
        return int(_field(result, "height", int, "/pop_blocks"))


async def flush_txpool(info: DevChainInfo) -> None:
    """Drop every transaction from the daemon's pool."""
    async with _rpc(info.daemon_url) as daemon:
        await daemon.call("flush_txpool", {})


async def height(info: DevChainInfo) -> int:
    """The daemon's chain height (block count)."""
    async with _rpc(info.daemon_url) as daemon:
        return await _block_count(daemon)


__all__ = [
    "DevChain",
    "DevChainInfo",
    "DevChainPorts",
    "flush_txpool",
    "height",
    "mine",
    "pay",
    "plan_ports",
    "pop_blocks",
    "xmr_to_atomic",
]
