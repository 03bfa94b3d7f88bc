"""The load generator: Debian's `wrk` with a Lua script that replays prepared requests.

Every scenario is a file of request lines (a JSON body for POST, a path for GET). The script
turns them into raw requests once, in `init` (so a request costs wrk a table lookup), cycles
through them, classifies every response (status, and for a 200 redeem `success` or
`already_claimed`) and prints one machine-readable line at the end:

    BENCH_JSON {"requests": ..., "duration_us": ..., "latency_us": {...}, "counts": {...}, ...}

`parse_wrk_output` reads that line (and nothing else), so the parser can be checked on a
canned output without running wrk.

Lines that must not be sent twice (fresh payment ids: a second redeem of one is an
`already_claimed`, another path) are replayed `once`: when a thread has sent all of its lines
it stops (`wrk.thread:stop()`), sends nothing more, and the result says the run ran out
(`exhausted`), when (`duration_s` is then the time it ran, by the thread's own monotonic
clock, not wrk's whole `-d`) and how many lines each thread sent, so the caller can take the
unsent ones back (`split_sent`). A run that runs out is short, not broken: before, the
script went round again (repeating ids), and a file with no line at all made wrk exit 1
("incomplete request at 1:1": wrk calls `request()` once before the run to check what it
returns). That first call is answered without using a line up: the check's request is
never sent.

wrk opens all its connections at once, and the first requests seem to wait while the server
sets up all of them: in a 5 s run at 64 connections that burst was most of the p99 (the
quart-trio ceiling: p99/p50 2.0 to 3.4, median 2.4; with the first requests spread, 1.2 to
1.5, median 1.4; the same rates). So the script's `delay()` holds each connection's first
request back a random 0 to `stagger_ms` (4 ms a connection, at most a second); wrk starts
its latency clock when it sends a request, so the wait is not counted as latency.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tests.process.proc import child_setup

T = TypeVar("T")

MARKER = "BENCH_JSON "
STAGGER_MS_PER_CONNECTION = 4
MAX_STAGGER_MS = 1000

# Arguments after `--`: METHOD FILE PATH NTHREADS FIRST STAGGER_MS ONCE. A thread keeps the
# lines i with i % NTHREADS == its id, so threads never send the same line; its first FIRST
# requests (one a connection) wait a random 0..STAGGER_MS; ONCE = 1: each line is sent once
# and the thread stops when it has none left (0: it goes round them again).
LUA_SCRIPT = r"""
local threads = {}
local nsetup = 0

-- A monotonic clock in microseconds (LuaJIT's FFI; Debian's wrk is built on LuaJIT): when a
-- thread that ran out stopped. Without it, a run that runs out keeps wrk's whole duration.
local have_ffi, ffi = pcall(require, "ffi")
local now_us
if have_ffi then
  ffi.cdef[[
    typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
    int clock_gettime(int clk_id, bench_timespec *tp);
  ]]
  local ts = ffi.new("bench_timespec")
  now_us = function()
    ffi.C.clock_gettime(1, ts)  -- CLOCK_MONOTONIC
    return tonumber(ts.tv_sec) * 1000000 + tonumber(ts.tv_nsec) / 1000
  end
else
  now_us = function() return -1 end
end

function setup(thread)
  thread:set("tid", nsetup)
  nsetup = nsetup + 1
  table.insert(threads, thread)
end

function init(args)
  local method, file, fixed_path, nthreads = args[1], args[2], args[3], tonumber(args[4])
  once = args[7] == "1"
  if method == "GET" then
    check_req = wrk.format("GET", "/", {})
  else
    check_req = wrk.format(method, fixed_path, {["Content-Type"] = "application/json"}, "{}")
  end
  -- wrk asks the first thread's request() once before the run, only to check it
  checked = tid ~= 0
  sent = 0
  exhausted = 0
  stopped_us = -1
  reqs = {}
  local i = 0
  for line in io.lines(file) do
    if line ~= "" then
      if i % nthreads == tid then
        if method == "GET" then
          reqs[#reqs + 1] = wrk.format("GET", line, {})
        else
          local hdr = {["Content-Type"] = "application/json"}
          reqs[#reqs + 1] = wrk.format(method, fixed_path, hdr, line)
        end
      end
      i = i + 1
    end
  end
  n = #reqs
  idx = 0
  wrapped = 0
  counts = {}
  first, stagger, started = tonumber(args[5]) or 0, tonumber(args[6]) or 0, 0
  t0 = now_us()
end

function delay()
  if started < first then
    started = started + 1
    return math.random(0, stagger)
  end
  return 0
end

function request()
  if not checked then
    checked = true
    return reqs[1] or check_req  -- wrk's check before the run: never sent
  end
  idx = idx + 1
  if idx > n then
    if once or n == 0 then
      -- Out of lines: stop this thread (its loop ends after this round of events; nothing
      -- more is sent, what is in flight is not waited for, as at the end of a timed run).
      if exhausted == 0 then
        exhausted = 1
        if t0 >= 0 then stopped_us = now_us() - t0 end
        wrk.thread:stop()
      end
      idx = n
      return ""
    end
    idx = 1
    wrapped = wrapped + 1
  end
  sent = sent + 1
  return reqs[idx]
end

function response(status, headers, body)
  local key = tostring(status)
  if status == 200 then
    if string.find(body, '"already_claimed"', 1, true) then
      key = "200:already_claimed"
    elseif string.find(body, '"success"', 1, true) then
      key = "200:success"
    end
  end
  counts[key] = (counts[key] or 0) + 1
end

function done(summary, latency, requests)
  local total = {}
  local wraps = 0
  local per_thread = {}
  for _, t in ipairs(threads) do
    local c = t:get("counts")
    if c then
      for k, v in pairs(c) do total[k] = (total[k] or 0) + v end
    end
    wraps = wraps + (t:get("wrapped") or 0)
    per_thread[#per_thread + 1] = string.format(
      '{"lines":%d,"sent":%d,"exhausted":%d,"stopped_us":%d}', t:get("n") or 0,
      t:get("sent") or 0, t:get("exhausted") or 0, t:get("stopped_us") or -1)
  end
  local parts = {}
  for k, v in pairs(total) do parts[#parts + 1] = string.format('"%s":%d', k, v) end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,' ..
    '"latency_us":{"p50":%.1f,"p90":%.1f,"p99":%.1f,"mean":%.1f,"max":%.1f,"min":%.1f},' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"counts":{%s},"wrapped":%d,"threads":[%s]}\n',
    summary.requests, summary.duration,
    latency:percentile(50.0), latency:percentile(90.0), latency:percentile(99.0),
    latency.mean, latency.max, latency.min,
    e.connect, e.read, e.write, e.status, e.timeout,
    table.concat(parts, ","), wraps, table.concat(per_thread, ",")))
end
"""


class WrkError(RuntimeError):
    """wrk did not run, or printed no result line."""


@dataclass
class WrkResult:
    requests: int
    duration_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    counts: dict[str, int]
    errors: dict[str, int]
    wrapped: int = 0
    # Per thread of wrk: its lines, how many of them it sent (the first ones, in order).
    lines_by_thread: list[int] = field(default_factory=list)
    sent_by_thread: list[int] = field(default_factory=list)
    # A `once` run whose lines ran out: every thread stopped early, and `duration_s` is how
    # long it ran (the last thread's stop, on the script's clock), not wrk's `-d`
    # (`planned_s`); with threads that ran to the end, or no clock, `planned_s` itself.
    exhausted: bool = False
    planned_s: float = 0.0
    # Filled in by `run_wrk` (not part of wrk's output).
    generator_cpu: float | None = None  # wrk's CPU time / wall time (1.0 = one core busy)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def tail(self) -> float:
        """p99 / p50: how much worse the slow requests are than the typical one."""
        return self.p99_ms / self.p50_ms if self.p50_ms > 0 else 0.0

    @property
    def socket_errors(self) -> int:
        return sum(v for k, v in self.errors.items() if k != "status")

    @property
    def lines_sent(self) -> int:
        return sum(self.sent_by_thread)

    def count_of(self, keys: Sequence[str]) -> int:
        return sum(self.counts.get(k, 0) for k in keys)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rps"] = round(self.rps, 1)
        d["tail_p99_over_p50"] = round(self.tail, 3)
        return d


def parse_wrk_output(text: str) -> WrkResult:
    """Read the `BENCH_JSON` line the script prints at the end of a run."""
    for line in reversed(text.splitlines()):
        if line.startswith(MARKER):
            data = json.loads(line[len(MARKER):])
            lat = data["latency_us"]
            planned = float(data["duration_us"]) / 1e6
            threads = data.get("threads", [])
            stopped = [int(t.get("stopped_us", -1)) for t in threads if t.get("exhausted")]
            exhausted = bool(stopped)
            duration = planned
            if threads and len(stopped) == len(threads) and min(stopped) >= 0:
                duration = max(stopped) / 1e6  # every thread ran out: the time it ran
            return WrkResult(
                requests=int(data["requests"]),
                duration_s=duration,
                p50_ms=float(lat["p50"]) / 1000,
                p90_ms=float(lat["p90"]) / 1000,
                p99_ms=float(lat["p99"]) / 1000,
                mean_ms=float(lat["mean"]) / 1000,
                max_ms=float(lat["max"]) / 1000,
                counts={str(k): int(v) for k, v in data.get("counts", {}).items()},
                errors={str(k): int(v) for k, v in data.get("errors", {}).items()},
                wrapped=int(data.get("wrapped", 0)),
                lines_by_thread=[int(t.get("lines", 0)) for t in threads],
                sent_by_thread=[int(t.get("sent", 0)) for t in threads],
                exhausted=exhausted, planned_s=planned,
            )
    raise WrkError(f"no {MARKER.strip()} line in wrk's output:\n{text[-2000:]}")


def wrk_binary() -> str | None:
    return shutil.which("wrk")


def wrk_version() -> str:
    exe = wrk_binary()
    if exe is None:
        return "not installed"
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10)
    first = (out.stdout or out.stderr).splitlines()
    return first[0].strip() if first else "unknown"


def write_script(directory: Path) -> Path:
    path = directory / "replay.lua"
    path.write_text(LUA_SCRIPT)
    return path


def write_lines(path: Path, lines: Sequence[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def split_sent(lines: Sequence[T], result: WrkResult) -> tuple[list[T], list[T]]:
    """The lines of a `once` run it sent and those it never sent (the caller may use those
    again): thread t had every line i with i % threads == t, and sent the first
    `sent_by_thread[t]` of them."""
    sent = result.sent_by_thread
    if not sent:
        return list(lines), []
    n = len(sent)
    out: tuple[list[T], list[T]] = ([], [])
    for i, line in enumerate(lines):
        out[i // n >= sent[i % n]].append(line)
    return out


def stagger_for(connections: int) -> int:
    """The window (ms) over which the connections' first requests are spread."""
    return min(MAX_STAGGER_MS, STAGGER_MS_PER_CONNECTION * connections)


def run_wrk(url: str, *, script: Path, method: str, path: str, lines_file: Path,
            connections: int, duration_s: int, threads: int = 1,
            cpus: set[int] | None = None, timeout_s: int = 10,
            stagger_ms: int | None = None, once: bool = False) -> WrkResult:
    """Drive `url` for `duration_s` seconds with `connections` keep-alive connections, their
    first requests spread over `stagger_ms` (default: `stagger_for(connections)`). `once`:
    send each line once, and stop early, cleanly, when they run out (`result.exhausted`)."""
    exe = wrk_binary()
    if exe is None:
        raise WrkError("wrk is not installed (Debian: apt-get install wrk)")
    threads = max(1, min(threads, connections))
    stagger = stagger_for(connections) if stagger_ms is None else stagger_ms
    cmd = [exe, "-t", str(threads), "-c", str(connections), "-d", f"{duration_s}s",
           "--timeout", f"{timeout_s}s", "-s", str(script), url,
           "--", method, str(lines_file), path, str(threads),
           str(math.ceil(connections / threads)), str(stagger), "1" if once else "0"]
    with tempfile.TemporaryFile(mode="w+") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=child_setup(cpus))
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        out.seek(0)
        text = out.read()
    if proc.returncode != 0:
        raise WrkError(f"wrk exited {proc.returncode}:\n{text[-2000:]}")
    result = parse_wrk_output(text)
    if wall > 0:
        result.generator_cpu = round((usage.ru_utime + usage.ru_stime) / wall, 3)
    return result
