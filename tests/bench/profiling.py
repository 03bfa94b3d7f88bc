"""Where the server's time goes: py-spy samples of the running server, summarised by layer.

`record` attaches py-spy (if installed; it is not a dependency of the project) to the server
for a few seconds while wrk drives the redeem path, in py-spy's collapsed-stack format
(`frame;frame;... count`, frames as `function (file:line)`). `summarise` leaves out the
samples of threads that wait (idle workers of trio's thread cache, the loop blocked in
epoll), then sorts every other sample by its innermost frame into a layer (hypercorn/h11,
quart/werkzeug, our handler, mailbox hops, the filter, storage/APSW, trio's scheduler,
metrics, logging, ...), and also counts, for a few of our functions, the share of samples
that have them anywhere on the stack.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

# (layer, substrings of the frame's file) in order: the first match wins.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("storage actor + APSW (SQL)", ("actors/storage.py", "apsw")),
    ("filter actor (Bloom, cache)", ("actors/filter.py", "domain/bloom.py")),
    ("hub actor (events)", ("actors/hub.py",)),
    ("mailbox hops (ask/reply)", ("supervisors/mailbox.py",)),
    ("our redeem/token handlers", ("actors/public.py",)),
    ("our HTTP helpers (web.py)", ("anon_ticket/web.py",)),
    ("our domain code (ids, tokens, time)", ("anon_ticket/domain/",)),
    ("prometheus metrics", ("prometheus_client/",)),
    ("logging", ("anon_ticket/logs.py", "logging/")),
    ("h11 (HTTP parsing)", ("h11/",)),
    ("socket send/recv (syscalls through trio)", ("trio/_socket.py", "trio/_highlevel_socket.py")),
    ("hypercorn", ("hypercorn/",)),
    ("quart / werkzeug / flask", ("quart/", "quart_trio/", "werkzeug/", "flask/")),
    ("trio scheduler and I/O", ("trio/", "outcome/", "sniffio/",
                                "<attrs generated methods trio.",
                                "<attrs generated methods outcome.")),
    ("json", ("json/",)),
)

# Inclusive shares (the frame anywhere on the stack): (label, function name or "", file part).
INCLUSIVE: tuple[tuple[str, str, str], ...] = (
    ("redeem handler (public.py: redeem)", "<locals>.redeem", "actors/public.py"),
    ("token handler (public.py: token)", "<locals>.token", "actors/public.py"),
    ("Mailbox.ask (request + wait for the reply)", "ask", "supervisors/mailbox.py"),
    ("storage transaction (_transaction)", "_transaction", "actors/storage.py"),
    ("storage claim handler (_claim)", "_claim", "actors/storage.py"),
    ("filter actor (anything)", "", "actors/filter.py"),
    ("hub actor (anything)", "", "actors/hub.py"),
    ("read_json_object", "read_json_object", "anon_ticket/web.py"),
    ("json_response", "json_response", "anon_ticket/web.py"),
    ("quart app (anything under quart/)", "", "quart/"),
    ("h11 (anything)", "", "h11/"),
    ("hypercorn (anything)", "", "hypercorn/"),
    ("prometheus metrics (anything)", "", "prometheus_client/"),
)


def _split(frame: str) -> tuple[str, str]:
    """`name (file:line)` -> (name, file)."""
    name, _, rest = frame.partition(" (")
    return name, rest.rsplit(":", 1)[0].rstrip(")")


def py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    if here.exists():
        return str(here)
    return shutil.which("py-spy")


def record(pid: int, out: Path, *, seconds: int, rate: int = 250) -> subprocess.Popen[bytes]:
    """Start sampling `pid` (py-spy's default blocking mode: consistent stacks)."""
    exe = py_spy()
    if exe is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    return subprocess.Popen(
        [exe, "record", "--pid", str(pid), "--format", "raw", "--function",
         "--rate", str(rate), "--duration", str(seconds), "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _frames(stack: str) -> list[str]:
    return [f for f in stack.split(";") if f]


# Innermost frames that mean "waiting, not working": an idle worker thread of trio's thread
# cache, or trio's loop blocked in epoll. py-spy's blocking mode samples them too.
IDLE: tuple[tuple[str, str], ...] = (
    ("WorkerThread._work", "trio/_core/_thread_cache.py"),
    ("EpollIOManager.get_events", "trio/_core/_io_epoll.py"),
    ("Condition.wait", "threading.py"),
    ("Lock.acquire", "threading.py"),
)


def _idle(frame: str) -> bool:
    name, where = _split(frame)
    return any(name == n and where.endswith(f) for n, f in IDLE)


def _layer(frame: str) -> str:
    where = _split(frame)[1]
    for name, needles in LAYERS:
        if any(n in where for n in needles):
            return name
    if "/" not in where or "python3" in where:  # py-spy shows the stdlib as `contextlib.py`
        return "Python stdlib (contextlib, enum, ...)"
    return "other"


def summarise(collapsed: str, *, top: int = 15) -> dict[str, Any]:
    total = idle = 0
    self_by_layer: Counter[str] = Counter()
    self_by_frame: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    inclusive_fn: Counter[str] = Counter()
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        n = int(count_text)
        frames = _frames(stack)
        # py-spy puts the thread name first; drop anything that is not a frame
        frames = [f for f in frames if "(" in f]
        if not frames:
            continue
        if _idle(frames[-1]):
            idle += n
            continue
        total += n
        leaf = frames[-1]
        self_by_layer[_layer(leaf)] += n
        self_by_frame[leaf] += n
        parsed = [_split(f) for f in frames]
        for label, func, part in INCLUSIVE:
            if any((not func or name == func or name.endswith("." + func)) and part in where
                   for name, where in parsed):
                inclusive[label] += n
        for f in set(frames):
            inclusive_fn[f] += n

    def pct(n: int) -> float:
        return round(100.0 * n / total, 1) if total else 0.0

    return {
        "samples": total,
        "idle_samples_left_out": idle,
        "self_by_layer_pct": {k: pct(v) for k, v in self_by_layer.most_common()},
        "inclusive_pct": {label: pct(inclusive[label]) for label, _, _ in INCLUSIVE},
        "top_self_frames": [[f, pct(v)] for f, v in self_by_frame.most_common(top)],
        "top_inclusive_frames": [[f, pct(v)] for f, v in inclusive_fn.most_common(top)],
    }
