"""One worker process, as the owner's supervisor sees it (docs/architecture.md §8).

The actor starts `python -m anon_ticket.worker` with two inherited descriptors, the public
listening socket (bound once by the owner: `SharedListener`) and its end of a unix socket
pair for the link, then serves that link: the worker's requests go to the owner's storage and
poller mailboxes with a reply slot that sends the answer back (no task per request), and what
the fanout queues for this worker goes out in one frame per wake-up.

The actor ends, and the supervisor restarts it with the usual backoff and intensity, when the
process exits, its link closes or falls silent (a hung worker: heartbeat), or the fanout
gives it up. On the way out the process is killed if it still runs. A graceful stop sends
SIGTERM: the worker drains its own connections and exits.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio

from anon_ticket.children import die_with_parent
from anon_ticket.domain.commands import Drain, WorkerMetrics
from anon_ticket.domain.inboxes import FanoutMsg, WorkerMsg
from anon_ticket.domain.messages import Acked, Attach, Detach
from anon_ticket.errors import AnonTicketError
from anon_ticket.logs import get_logger
from anon_ticket.web import describe_socket, listening_socket
from anon_ticket.wire import (
    FrameReader,
    WireError,
    decode_ask,
    decode_failure,
    decode_reply,
    encode_failure,
    encode_reply,
    frame,
)
from mailboxes import Envelope, Failure, Mailbox, Outbox, unhandled

log = get_logger("worker")

HELLO_TIMEOUT = 30.0
QUEUE = 65536  # messages queued for one worker before it is given up


class WorkerLost(AnonTicketError):
    """The worker process exited, or its link ended: restart it."""


class SharedListener:
    """The public listening socket, bound once by the owner and inherited by every worker
    (one accept queue: a worker that dies loses none of the connections waiting in it, as
    SO_REUSEPORT's per-socket queues would)."""

    def __init__(self, *, unix_path: Path | None, host: str | None, port: int | None) -> None:
        self._args = dict(unix_path=unix_path, mode=0o666, host=host, port=port)
        self._stack = contextlib.ExitStack()
        self._sock: socket.socket | None = None

    def socket(self) -> socket.socket:
        if self._sock is None:
            self._sock = self._stack.enter_context(listening_socket(**self._args))  # type: ignore[arg-type]
            log.info("public listener serving", address=describe_socket(self._sock))
        return self._sock

    def close(self) -> None:
        self._stack.close()
        self._sock = None


class Child:
    """A worker process that dies with its owner: forked from trio's thread with
    PR_SET_PDEATHSIG = SIGKILL (anon_ticket/children.py), so a kill -9 of the owner leaves no
    worker holding the public port, not even one still starting. Its exit is awaited on a
    pidfd, as trio's own processes are."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self.pid = popen.pid
        self._pidfd = os.pidfd_open(popen.pid)

    @classmethod
    def spawn(cls, argv: list[str], *, pass_fds: tuple[int, ...],
              env: dict[str, str]) -> Child:
        # Forking here blocks trio's thread for a few milliseconds, once per worker start.
        popen = subprocess.Popen(argv, pass_fds=pass_fds, env=env, stdin=subprocess.DEVNULL,
                                 start_new_session=True,  # a terminal's ^C reaches the owner
                                 preexec_fn=die_with_parent(signal.SIGKILL))
        return cls(popen)

    @property
    def returncode(self) -> int | None:
        return self._popen.poll()

    def send_signal(self, sig: int) -> None:
        if self._popen.poll() is None:
            self._popen.send_signal(sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    async def wait(self) -> int:
        if self._popen.poll() is None:
            await trio.lowlevel.wait_readable(self._pidfd)  # readable once it has exited
        return self._popen.wait()

    def close(self) -> None:
        if self._pidfd >= 0:
            trio.lowlevel.notify_closing(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    settings_json: str  # the worker's Settings (anon_ticket/worker.py reads them)
    request_timeout: float
    heartbeat: float = 1.0
    silence: float = 5.0


class _Answer:
    """A reply slot whose answer goes back over the link to the worker that asked."""

    __slots__ = ("queue", "rid")

    def __init__(self, queue: Outbox[list[Any]], rid: int) -> None:
        self.queue = queue
        self.rid = rid

    def put(self, value: object) -> None:
        if isinstance(value, Failure):
            kind, text, retry_after = encode_failure(value.error)
            item: list[Any] = ["fail", self.rid, kind, text, retry_after]
        else:
            shape, encoded = encode_reply(value)
            item = ["reply", self.rid, shape, encoded]
        if not self.queue.put(item):
            self.queue.mark_slow()


class WorkerProcess:
    def __init__(self, index: int, config: WorkerConfig, listener: SharedListener,
                 targets: dict[str, Mailbox[Any]], fanout: Mailbox[FanoutMsg],
                 mailbox: Mailbox[WorkerMsg] | None = None) -> None:
        self.name = f"worker-{index}"
        self.index = index
        self.mailbox = mailbox  # what the owner asks of this worker (its metrics)
        self._asks: dict[int, Envelope[Any]] = {}
        self._ids = itertools.count(1)
        self.config = config
        self.listener = listener
        self.targets = targets  # the owner's mailboxes a worker may ask: storage, poller
        self.fanout = fanout
        self.process: Child | None = None
        self._stopping = False
        self._heard = 0.0

    def stop(self) -> None:
        """Graceful: the worker closes its watchers, finishes in-flight requests, exits."""
        self._stopping = True
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        public = self.listener.socket()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        queue: Outbox[list[Any]] = Outbox(QUEUE)
        try:
            with theirs:
                env = {**os.environ, "ANON_TICKET_WORKER_SETTINGS": self.config.settings_json}
                self.process = Child.spawn(
                    [sys.executable, "-m", "anon_ticket.worker", str(self.index),
                     str(theirs.fileno()), str(public.fileno())],
                    pass_fds=(theirs.fileno(), public.fileno()), env=env)
            log.info("worker started", worker=self.index, os_pid=self.process.pid)
            # Started: the supervisor goes on (workers start side by side); a worker that
            # never says hello or attaches ends this run like any other failure.
            task_status.started()
            stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
            with queue.scope:  # cancelled by the fanout when it gives this worker up
                async with stream, trio.open_nursery() as nursery:
                    nursery.start_soon(self._exited, nursery.cancel_scope)
                    reader = FrameReader()
                    with trio.fail_after(HELLO_TIMEOUT):
                        await self._hello(stream, reader)
                    await self.fanout.ask(Attach(self.index, queue), self.config.request_timeout)
                    queue.put(["attached"])
                    nursery.start_soon(self._writer, stream, queue)
                    nursery.start_soon(self._beat, queue)
                    if self.mailbox is not None:
                        nursery.start_soon(self.mailbox.serve, partial(self._ask, queue))
                    await self._read(stream, reader, queue)
        finally:
            with contextlib.suppress(AnonTicketError):
                self.fanout.tell(Detach(self.index, queue))
            with trio.CancelScope(shield=True):
                await self._reap()
        if queue.slow:
            raise WorkerLost("given up by the fanout (too slow to acknowledge or read)")
        if not self._stopping:
            raise WorkerLost(f"worker exited with {self._code()}")

    def _ask(self, queue: Outbox[list[Any]], env: Envelope[WorkerMsg]) -> None:
        """The owner asks the worker (its metrics, a drain): answered when it answers."""
        msg = env.msg
        if isinstance(msg, WorkerMetrics):
            what, arg = "metrics", None
        elif isinstance(msg, Drain):
            what, arg = "drain", msg.reason
        else:
            unhandled(self.name, env)
            return
        rid = next(self._ids)
        self._asks[rid] = env
        queue.put(["ask", rid, what, arg])
        now = trio.current_time()
        for old, waiting in list(self._asks.items()):  # whoever gave up
            if waiting.deadline < now:
                del self._asks[old]

    def _code(self) -> object:
        return None if self.process is None else self.process.returncode

    async def _exited(self, scope: trio.CancelScope) -> None:
        assert self.process is not None
        await self.process.wait()
        scope.cancel()

    async def _reap(self) -> None:
        proc = self.process
        if proc is None:
            return
        if proc.returncode is None:
            proc.kill()
        try:
            code = await proc.wait()
        finally:
            proc.close()
        if self._stopping and code == 0:
            log.info("worker stopped", worker=self.index)
        else:
            log.warning("worker ended", worker=self.index, code=code)

    async def _hello(self, stream: trio.SocketStream, reader: FrameReader) -> None:
        while True:
            data = await stream.receive_some(1 << 16)
            if not data:
                raise WorkerLost("worker closed its link before saying hello")
            messages = reader.feed(data)
            if messages:
                hello = messages[0]
                if hello[:2] != ["hello", self.index] or len(messages) > 1:
                    raise WireError(f"expected hello from worker {self.index}")
                self._heard = trio.current_time()
                return

    async def _read(self, stream: trio.SocketStream, reader: FrameReader,
                    queue: Outbox[list[Any]]) -> None:
        timeout = self.config.request_timeout
        while True:
            try:
                data = await stream.receive_some(1 << 16)
            except trio.BrokenResourceError:
                data = b""
            if not data:
                if self._stopping:
                    return  # its process exits: _exited ends the nursery
                raise WorkerLost(f"worker {self.index} closed its link")
            self._heard = trio.current_time()
            for msg in reader.feed(data):
                kind = msg[0]
                if kind == "ask":
                    rid, what, arg = msg[1], msg[2], msg[3]
                    target, req = decode_ask(what, arg)
                    mailbox = self.targets.get(target)
                    deadline = trio.current_time() + timeout
                    if mailbox is None or not mailbox.post(req, _Answer(queue, rid), deadline):
                        queue.put(["fail", rid, "unavailable", f"{target} is not available", 1])
                elif kind == "ack":
                    self.fanout.tell(Acked(self.index, msg[1]))
                elif kind == "reply":
                    env = self._asks.pop(msg[1], None)
                    if env is not None:
                        env.reply(str(msg[3]) if msg[2] == "text" else decode_reply(msg[2],
                                                                                    msg[3]))
                elif kind == "fail":
                    env = self._asks.pop(msg[1], None)
                    if env is not None:
                        env.fail(decode_failure(msg[2], msg[3], msg[4]))
                elif kind != "beat":
                    raise WireError(f"unknown message {kind!r} from worker {self.index}")

    async def _writer(self, stream: trio.SocketStream, queue: Outbox[list[Any]]) -> None:
        while True:
            first = await queue.get()
            items = [first, *queue.take_all()]
            with trio.move_on_after(self.config.silence) as timer:
                try:
                    await stream.send_all(frame(items))
                except trio.BrokenResourceError:
                    if self._stopping:
                        return  # it closed its link on its way out: wait for its exit
                    raise WorkerLost(f"worker {self.index} closed its link") from None
            if timer.cancelled_caught:
                raise WorkerLost(f"worker {self.index} stopped reading its link")

    async def _beat(self, queue: Outbox[list[Any]]) -> None:
        while True:
            await trio.sleep(self.config.heartbeat)
            if self._stopping:
                return  # the supervisor's grace period bounds a stop
            if trio.current_time() - self._heard > self.config.silence:
                raise WorkerLost(f"worker {self.index} silent for {self.config.silence:g} s "
                                 "(hung)")
            queue.put(["beat"])
