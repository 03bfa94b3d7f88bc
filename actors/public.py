"""The public listener: hypercorn (trio worker) + quart-trio, on TCP or a unix socket.

Routes are those of the original anon-ticket (docs/architecture.md §6) plus `/api/v1/info`
and `/healthz`.
No internal route is served here (I9). The redeem path asks the filter (a Bloom negative
answers 404 with no storage work; a cached claim answers `already_claimed`), which forwards
anything else to storage: the handler waits once.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio
from quart import Response, request, websocket
from quart_trio import QuartTrio

from anon_ticket import __version__, checkout, openapi
from anon_ticket.domain.address import network_of
from anon_ticket.domain.commands import Drain, Figures, PollerStatus, StorageHealth
from anon_ticket.domain.ids import PaymentId, ServiceToken
from anon_ticket.domain.inboxes import FilterMsg, HubMsg, PollerMsg, PublicMsg, StorageMsg
from anon_ticket.domain.messages import (
    Claimed,
    LookupToken,
    Presence,
    ReadTicketState,
    Redeem,
)
from anon_ticket.domain.ratelimit import TokenBucket
from anon_ticket.domain.watch import (
    GOING_AWAY,
    MAX_SUBSCRIPTIONS,
    SLOW_CONSUMER,
    TRY_AGAIN_LATER,
    Drop,
    Key,
    Replay,
    Subscribe,
    Unsubscribe,
    WatchEvent,
    WatchItem,
    WatchReady,
    WatchRequest,
    WatchText,
    encode,
    error_message,
    event_message,
    gap_message,
    parse_request,
    pending_messages,
    state_message,
)
from anon_ticket.errors import AnonTicketError, InvalidInput, NotFound, Unavailable
from anon_ticket.logs import get_logger
from anon_ticket.metrics import Metrics
from anon_ticket.web import (
    describe_socket,
    error_response,
    json_error,
    json_response,
    listening_socket,
    new_app,
    read_json_object,
    serve_app,
)
from mailboxes import Dispatch, Envelope, Mailbox, Outbox

log = get_logger("public")

NOT_FOUND = "payment not found"
MAX_HOLD_SECS = 5.0  # the longest an answer about an unknown id is held back
PONG = WatchText(encode({"type": "pong"}))


@dataclass(frozen=True, slots=True)
class PublicConfig:
    host: str
    port: int
    unix_socket: Path | None
    max_body_bytes: int
    request_timeout: float
    grace: float
    network: str | None
    primary_address: str | None
    min_confirmations: int
    min_payment_amount: int
    max_watchers: int = 10_000
    max_connections: int = 10_000
    keep_alive: float = 30.0
    read_timeout: float = 10.0
    write_timeout: float = 10.0
    unknown_rate: float = 200.0  # answers about unknown ids a second before they are held
    watch_send_timeout: float = 10.0
    websocket_ping_interval: float = 20.0
    # A worker process serves the owner's listening socket, inherited (docs/architecture.md §8)
    inherited_fd: int | None = None
    worker: int | None = None  # which worker this is (named by /healthz)


@dataclass(eq=False, slots=True)
class _KeyState:
    key: Key
    seq: int | None = None  # None until the state (or replay) is sent
    pending: list[WatchEvent] | None = None  # events that came before it (rarely any)


@dataclass(eq=False, slots=True)
class _WatchConnection:
    ws: Any
    watcher: Outbox[WatchItem]  # what the reader and the hub queue for the writer
    subs: dict[bytes, _KeyState] = field(default_factory=dict)
    close: tuple[int, str] | None = None


class Public:
    name = "public"

    def __init__(self, config: PublicConfig, storage: Mailbox[StorageMsg],
                 filter_: Mailbox[FilterMsg], metrics: Metrics,
                 poller: Mailbox[PollerMsg] | None = None, hub: Mailbox[HubMsg] | None = None,
                 mailbox: Mailbox[PublicMsg] | None = None) -> None:
        self.config = config
        self.storage = storage
        self.filter = filter_
        self.poller = poller
        self.hub = hub
        self.mailbox = mailbox
        self.metrics = metrics
        self._stop = trio.Event()
        self._closing = trio.Event()
        self._connections: set[_WatchConnection] = set()
        self._no_watchers = trio.Event()
        self._no_watchers.set()
        self.address: str | None = None
        rate = config.unknown_rate
        self._unknown = (TokenBucket(rate, burst=2 * rate, max_wait=MAX_HOLD_SECS)
                         if rate > 0 else None)  # full at first: it refills to its burst

    async def hold_unknown(self) -> None:
        """Hold an answer about an unknown id once such answers pass their rate (a spray is
        a closed loop: held answers slow it down); past the longest hold every one waits
        that long. Answers about recorded ids never come here."""
        bucket = self._unknown
        if bucket is None:
            return
        wait = bucket.reserve(trio.current_time())
        if wait != 0.0:
            self.metrics.held_unknown.inc()
            await trio.sleep(bucket.max_wait if wait is None else wait)

    @property
    def draining(self) -> bool:
        return self._closing.is_set()

    def drain(self, reason: str) -> None:
        """Claims answer 503 with Retry-After from now on; watchers are closed (1001)."""
        if not self.draining:
            log.info("draining", reason=reason, watchers=len(self._connections))
        self._closing.set()
        for conn in self._connections:
            conn.close = conn.close or (GOING_AWAY, "server draining")
            conn.watcher.scope.cancel()

    async def stop(self) -> None:
        """Close websockets first (1001), then stop intake: hypercorn lets in-flight requests
        finish within the grace period."""
        self.drain("stopping")
        with trio.move_on_after(min(2.0, self.config.grace)):
            await self._no_watchers.wait()
        self._stop.set()

    async def _serve_commands(self) -> None:
        assert self.mailbox is not None
        await self.mailbox.serve(Dispatch(self.name, {Drain: self._drain_command}))

    def _drain_command(self, env: Envelope[Drain]) -> None:
        self.drain(env.msg.reason)
        env.reply({"draining": True, "watchers_closing": len(self._connections)})

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config
        # The public socket serves the public API: readable by any local user (a proxy).
        with (socket.socket(fileno=os.dup(cfg.inherited_fd)) if cfg.inherited_fd is not None
              else listening_socket(unix_path=cfg.unix_socket, mode=0o666, host=cfg.host,
                                    port=cfg.port)) as sock:
            self.address = describe_socket(sock)
            log.info("public listener serving", address=self.address)
            app = self.create_app()
            async with trio.open_nursery() as nursery:
                await nursery.start(partial(
                    self._serve_http, app, sock, nursery.cancel_scope))
                if self.mailbox is not None:
                    nursery.start_soon(self._serve_commands)
                task_status.started()
            log.info("public listener stopped")

    async def _serve_http(self, app: QuartTrio, sock: socket.socket, done: trio.CancelScope,
                          *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                          ) -> None:
        await serve_app(app, sock, grace=self.config.grace, shutdown=self._stop.wait,
                        task_status=task_status,
                        ws_ping_interval=self.config.websocket_ping_interval,
                        ws_max_message=self.config.max_body_bytes,
                        keep_alive_timeout=self.config.keep_alive,
                        read_timeout=self.config.read_timeout,
                        write_timeout=self.config.write_timeout,
                        max_connections=self.config.max_connections,
                        stats=(self.metrics, "public"))
        done.cancel()  # the command loop ends with the server

    # --- the watch protocol -----------------------------------------------------------------

    async def _watch(self) -> None:
        ws = websocket._get_current_object()  # type: ignore[attr-defined]
        await ws.accept()
        if self.hub is None or self.draining:
            await ws.close(GOING_AWAY, "server draining")
            return
        if len(self._connections) >= self.config.max_watchers:
            await ws.close(TRY_AGAIN_LATER, "too many connections")
            return
        watcher: Outbox[WatchItem] = Outbox()
        conn = _WatchConnection(ws, watcher)
        if not self._connections:
            self._no_watchers = trio.Event()
        self._connections.add(conn)
        try:
            with watcher.scope:  # cancelled by the hub (slow) or by a drain
                await self._serve_watch(conn)
        finally:
            self._connections.discard(conn)
            if not self._connections:
                self._no_watchers.set()
            try:
                self.hub.tell(Drop(watcher))
            except AnonTicketError:
                pass
        if watcher.slow:
            conn.close = (SLOW_CONSUMER, "slow consumer")
        if conn.close is not None:
            with trio.move_on_after(1.0):
                await ws.close(*conn.close)

    async def _serve_watch(self, conn: _WatchConnection) -> None:
        """The connection's reader (a task of its own) and writer (this task).

        A client that leaves cancels both from outside (quart-trio cancels the handler). That
        leaves here as one `Cancelled`, not as the nursery's group of them: quart's handler
        catches a group, and its handling tied the group, its tracebacks and so the whole
        connection (about 45 KB) into reference cycles that only a full collection frees,
        which a long-running server seldom runs (an outside run's 10,000 watchers took 620 MB
        and kept it after they left).
        """
        cancelled: trio.Cancelled | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_loop, conn)
                await self._write_loop(conn)
        except BaseExceptionGroup as group:
            cancelled = _only_cancelled(group)
            if cancelled is None:
                raise
        if cancelled is not None:
            try:
                raise cancelled
            finally:
                del cancelled  # this frame is in its traceback: no cycle through it

    async def _send(self, conn: _WatchConnection, text: str) -> None:
        with trio.move_on_after(self.config.watch_send_timeout) as timeout:
            await conn.ws.send(text)
        if timeout.cancelled_caught:
            conn.watcher.mark_slow()

    @staticmethod
    def _push(conn: _WatchConnection, item: WatchItem) -> None:
        """Queue an answer of the reader's for the writer; a full queue is a slow consumer."""
        if not conn.watcher.put(item):
            conn.watcher.mark_slow()

    async def _read_loop(self, conn: _WatchConnection) -> None:
        while True:
            text = await conn.ws.receive()
            try:
                req = parse_request(text)
                if req.op == "ping":
                    self._push(conn, PONG)
                elif req.op == "subscribe":
                    await self._subscribe(conn, req)
                else:
                    assert req.key is not None
                    if conn.subs.pop(req.key.raw, None) is not None:
                        assert self.hub is not None
                        await self.hub.ask(Unsubscribe(conn.watcher, req.key.raw),
                                           self.config.request_timeout)
            except InvalidInput as exc:
                self._push(conn, WatchText(encode(error_message(str(exc)))))
            except NotFound:
                self._push(conn, WatchText(encode(error_message(NOT_FOUND))))
            except Unavailable:
                self._push(conn, WatchText(encode(error_message(
                    "service temporarily unavailable"))))

    async def _subscribe(self, conn: _WatchConnection, req: WatchRequest) -> None:
        assert req.key is not None and self.hub is not None
        key, raw, timeout = req.key, req.key.raw, self.config.request_timeout
        if raw in conn.subs:
            raise InvalidInput("invalid request: already subscribed")
        if len(conn.subs) >= MAX_SUBSCRIPTIONS:
            raise InvalidInput(f"invalid request: at most {MAX_SUBSCRIPTIONS} subscriptions "
                               "per connection")
        await self.hold_unknown()  # a state read each: a flood of them waits its turn
        # Register first, then read the state: nothing committed in between is lost, and
        # what the state already covers (seq <= n) is dropped when it arrives. The hub
        # refuses a key that has its fill of watchers (InvalidInput, sent as an error).
        conn.subs[raw] = _KeyState(key)
        try:
            pending = await self.hub.ask(Subscribe(conn.watcher, raw), timeout)
            state = await self.storage.ask(ReadTicketState(pid=key.pid, token=key.token),
                                           timeout)
            replay = None
            resumable = (req.since is not None and req.epoch == state.epoch
                         and req.since <= state.seq)
            if resumable:
                assert req.since is not None
                replay = await self.hub.ask(Replay(state.pid.raw, req.since, state.seq),
                                            timeout)
        except AnonTicketError:
            conn.subs.pop(raw, None)
            try:
                await self.hub.ask(Unsubscribe(conn.watcher, raw), timeout)
            except AnonTicketError:
                pass
            raise
        gap = req.since is not None and replay is None
        self._push(conn, WatchReady(raw, state, replay, gap, pending))

    async def _write_loop(self, conn: _WatchConnection) -> None:
        """Sends what the reader and the hub queued. The hub's events come encoded (once per
        key for all its watchers)."""
        watcher = conn.watcher
        while True:
            item = await watcher.get()
            if isinstance(item, WatchText):
                await self._send(conn, item.text)
                continue
            ks = conn.subs.get(item.key)
            if ks is None:
                continue  # unsubscribed meanwhile
            if isinstance(item, WatchReady):
                if item.gap:
                    await self._send(conn, encode(gap_message(ks.key)))
                if item.replay is not None:
                    for event in item.replay:
                        await self._send(conn, encode(event_message(ks.key, event)))
                    for payment in item.pending:  # what a state would have carried
                        for message in pending_messages(ks.key, payment):
                            await self._send(conn, encode(message))
                else:
                    await self._send(conn, encode(state_message(ks.key, item.state,
                                                                item.pending)))
                ks.seq = item.state.seq
                pending, ks.pending = ks.pending, None
                for held in pending or ():
                    await self._forward(conn, ks, held)
            elif ks.seq is None:
                if ks.pending is None:
                    ks.pending = []
                ks.pending.append(item)  # until its state is out
            else:
                await self._forward(conn, ks, item)

    async def _forward(self, conn: _WatchConnection, ks: _KeyState, item: WatchEvent
                       ) -> None:
        seq = item.seq
        if seq is not None:  # a committed fact: skip what the state or replay covered
            assert ks.seq is not None
            if seq <= ks.seq:
                return
            ks.seq = seq
        await self._send(conn, item.text)

    # --- the app ----------------------------------------------------------------------------

    def create_app(self) -> QuartTrio:
        app = new_app("anon_ticket.public", max_body_bytes=self.config.max_body_bytes,
                      read_timeout=self.config.read_timeout)
        cfg = self.config
        timeout = cfg.request_timeout
        metrics = self.metrics
        outcomes = {name: metrics.redeem_requests.labels(name) for name in (
            "success", "already_claimed", "not_found", "invalid", "unavailable", "error")}
        storage, filter_ = self.storage, self.filter

        @app.post("/api/v1/redeem")
        async def redeem() -> Response:
            if self.draining:
                outcomes["unavailable"].inc()
                return json_error(503, "service is draining", 5)
            try:
                data = await read_json_object(request)
                if "pid" not in data:
                    raise InvalidInput("invalid request: missing field `pid`")
                pid = PaymentId.parse(data["pid"])
                try:  # one wait: the filter answers, or storage does for it
                    result = await filter_.ask(Redeem(pid), timeout)
                except NotFound:  # the Bloom filter said maybe; storage knows better
                    metrics.redeem_bloom_db_miss.inc()
                    raise
                if result is Presence.ABSENT:
                    outcomes["not_found"].inc()
                    await self.hold_unknown()
                    return json_error(404, NOT_FOUND)
                assert isinstance(result, Claimed)
            except AnonTicketError as exc:
                outcomes[_outcome(exc)].inc()
                if isinstance(exc, NotFound):
                    await self.hold_unknown()
                return error_response(exc)
            outcomes[result.status.value].inc()
            return json_response({"status": result.status.value,
                                  "service_token": result.token.hex(),
                                  "balance": result.balance})

        token_counter = metrics.token_requests

        @app.get("/api/v1/token/<token>")
        async def token(token: str) -> Response:
            try:
                tok = ServiceToken.parse(token)
                info = await storage.ask(LookupToken(tok), timeout)
            except AnonTicketError as exc:
                token_counter.labels("token", _outcome(exc)).inc()
                if isinstance(exc, NotFound):
                    await self.hold_unknown()
                return error_response(exc)
            token_counter.labels("token", "ok").inc()
            return json_response({
                "status": "revoked" if info.revoked else "active",
                "amount": info.amount,
                "issued_at": info.issued_at,
                "revoked_at": info.revoked_at,
                "abuse_score": info.abuse_score,
            })

        async def chain_status() -> Figures | None:
            if self.poller is None:
                return None
            try:
                return await self.poller.ask(PollerStatus(), 1.0)
            except AnonTicketError:
                return None

        async def storage_health() -> Figures:
            try:
                return await storage.ask(StorageHealth(), 1.0)
            except AnonTicketError as exc:
                return {"writable": None, "error": str(exc)}

        @app.get("/api/v1/info")
        async def info() -> Response:
            primary, network = cfg.primary_address, cfg.network
            if primary is None:
                status = await chain_status()
                primary = status["primary_address"] if status else None
                if network is None and primary:
                    network = network_of(primary)
            return json_response({
                "network": network,
                "primary_address": primary,
                "min_confirmations": cfg.min_confirmations,
                "min_payment_amount": cfg.min_payment_amount,
                "version": __version__,
            })

        openapi_document = openapi.document_bytes()  # read once, served as checked in

        @app.get(openapi.PATH)
        async def openapi_json() -> Response:
            return Response(openapi_document, content_type="application/json")

        @app.websocket("/api/v1/watch")
        async def watch() -> None:
            await self._watch()

        @app.get("/healthz")
        async def healthz() -> Response:
            actors = {"storage": storage.serving, "filter": filter_.serving}
            if self.draining:
                return json_response({"status": "draining", "actors": actors}, 503,
                                     {"Retry-After": "5"})
            if not all(actors.values()):
                return json_response({"status": "unavailable", "actors": actors}, 503,
                                     {"Retry-After": "1"})
            # Storage answers from memory (it probes with a tiny write only while its writes
            # fail, at most once a second): one mailbox round trip, no SQL in the common case.
            writes = await storage_health()
            body: dict[str, Any] = {"status": "ok", "actors": actors, "storage": writes}
            if self.config.worker is not None:
                body["worker"] = self.config.worker
            if self.poller is not None:
                chain = await chain_status()
                body["chain"] = chain
                # (a standby node: another one polls, docs/architecture.md §9)
                if chain is None or chain["state"] not in ("ok", "standby"):
                    body["status"] = "degraded"  # redemption of recorded payments still works
            if writes["writable"] is False:  # no claim can commit: not healthy
                body["status"] = "unavailable"
                return json_response(body, 503, {"Retry-After": "5"})
            if writes["writable"] is None:
                body["status"] = "degraded"  # slow to answer: claims may still commit
            return json_response(body)

        checkout.register(app)  # the payer's page and its no-JavaScript form (README)
        return app


def _only_cancelled(group: BaseExceptionGroup[BaseException]) -> trio.Cancelled | None:
    """One of the `Cancelled` in `group` when it holds nothing else, else None."""
    found: trio.Cancelled | None = None
    todo: list[BaseException] = [group]
    while todo:
        exc = todo.pop()
        if isinstance(exc, BaseExceptionGroup):
            todo.extend(exc.exceptions)
        elif isinstance(exc, trio.Cancelled):
            found = exc
        else:
            return None
    return found


def _outcome(exc: AnonTicketError) -> str:
    if isinstance(exc, InvalidInput):
        return "invalid"
    if isinstance(exc, NotFound):
        return "not_found"
    if isinstance(exc, Unavailable):
        return "unavailable"
    return "error"
