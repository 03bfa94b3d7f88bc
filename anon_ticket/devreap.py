"""`python -m anon_ticket.devreap ROOT`: the dev chain's reaper (anon_ticket/devchain.py).

The dev chain's children (monerod and two wallet-rpcs) must not outlive the process that
started them, even one killed with SIGKILL, and they must stop in order: the wallets first
(SIGTERM makes them save; a wallet whose daemon vanishes under it at the same moment can hang
in its own exit), then monerod. A signal sent to each at its parent's death reaches them all
at once, so instead this small process, started beside them, gets that signal
(`PR_SET_PDEATHSIG`), stops them by their PID files in that order, and sends SIGKILL to any
that has not ended within its grace. A clean stop of the chain stands it down (SIGUSR1).

No imports beyond the standard library: it lives as long as the chain and starts in a moment.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

DAEMON_BIN = "monerod"
WALLET_BIN = "monero-wallet-rpc"
DAEMON = "monerod"  # its PID file is pids/monerod.pid; the wallets' are the others
WALLET_GRACE = 15.0  # seconds a wallet may take to save and exit after SIGTERM
DAEMON_GRACE = 20.0  # ...and monerod to flush its database


def proc_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def is_ours(pid: int, root: Path) -> bool:
    """Alive, a monero binary, and started for `root` (guards against PID reuse)."""
    args = proc_cmdline(pid)  # empty for a zombie or a vanished process
    if not args or Path(args[0]).name not in (DAEMON_BIN, WALLET_BIN):
        return False
    needle = str(root)
    return any(a == needle or a.startswith(needle + "/") or f"={needle}/" in a for a in args)


def wait_gone(pids: Iterable[int], root: Path, timeout: float) -> list[int]:
    """Wait until none of `pids` is ours any more; return those still alive at the deadline."""
    deadline = time.monotonic() + timeout
    left = [p for p in pids if is_ours(p, root)]
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = [p for p in left if is_ours(p, root)]
    return left


def reap(root: Path, *, wallet_grace: float = WALLET_GRACE, daemon_grace: float = DAEMON_GRACE,
         say: Callable[[str, str, int], None] = lambda event, child, pid: None) -> None:
    """Stop the children of `root` by their PID files: the wallets, then monerod; SIGTERM,
    then SIGKILL after the grace. A PID is signalled only while it is a monero binary started
    for this root. `say(event, child, pid)`: `stopping`, or `sigkill`."""
    pid_dir = root / "pids"
    if not pid_dir.is_dir():
        return
    files = sorted(pid_dir.glob("*.pid"))
    wallets = [f for f in files if f.name != f"{DAEMON}.pid"]
    daemon = [f for f in files if f.name == f"{DAEMON}.pid"]
    for group, grace in ((wallets, wallet_grace), (daemon, daemon_grace)):
        pids: dict[int, str] = {}
        for f in group:
            try:
                pid = int(f.read_text().strip())
            except (OSError, ValueError):
                continue
            if is_ours(pid, root):
                say("stopping", f.stem, pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                pids[pid] = f.stem
        for pid in wait_gone(pids, root, grace):
            say("sigkill", pids[pid], pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_gone(pids, root, 5.0)
        for f in group:
            with contextlib.suppress(FileNotFoundError):
                f.unlink()


def main(argv: list[str]) -> int:
    root = Path(argv[0])
    parent = os.getppid()
    waited = {signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGUSR1}
    signal.pthread_sigmask(signal.SIG_BLOCK, waited)
    while True:
        info = signal.sigtimedwait(waited, 1.0)
        if info is None and os.getppid() == parent:
            continue  # (the parent lives; the check covers a death signal never set)
        if info is not None and info.si_signo == signal.SIGUSR1:
            return 0  # the chain was stopped cleanly: nothing to do

        def say(event: str, child: str, pid: int) -> None:
            what = ("stopping it" if event == "stopping"
                    else "it ignored SIGTERM: SIGKILL")
            print(f"anon-ticket dev chain reaper: the server is gone; {child} (pid {pid}): "
                  f"{what}", file=sys.stderr, flush=True)

        reap(root, say=say)
        return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
