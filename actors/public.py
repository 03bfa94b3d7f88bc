"""The public listener: hypercorn (trio worker) + quart-trio, on TCP or a unix socket.

Routes are those of the original anon-ticket (DESIGN §4) plus `/api/v1/info` and `/healthz`.
No internal route is served here (I9). The redeem path asks the filter (a Bloom negative
answers 404 with no storage work; a cached claim answers `already_claimed`), which forwards
anything else to storage: the handler waits once.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio
from quart import Response, request, websocket
from quart_trio import QuartTrio

from actors.hub import Drop, Replay, Subscribe, Unsubscribe, Watcher
from anon_ticket import __version__
from anon_ticket.domain.address import network_of
from anon_ticket.domain.ids import PaymentId, ServiceToken
from anon_ticket.domain.messages import (
    Claimed,
    Drain,
    LookupToken,
    PollerStatus,
    Presence,
    ReadTicketState,
    Redeem,
    TicketState,
)
from anon_ticket.domain.watch import (
    GOING_AWAY,
    MAX_SUBSCRIPTIONS,
    SLOW_CONSUMER,
    TRY_AGAIN_LATER,
    Key,
    WatchRequest,
    error_message,
    event_message,
    gap_message,
    note_message,
    parse_request,
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
from supervisors.mailbox import Envelope, Mailbox

log = get_logger("public")

NOT_FOUND = "payment not found"


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
    watch_send_timeout: float = 10.0
    websocket_ping_interval: float = 20.0


@dataclass(eq=False)
class _KeyState:
    key: Key
    seq: int | None = None  # None until the state (or replay) is sent
    pending: list[tuple[Any, ...]] = field(default_factory=list)


@dataclass(eq=False)
class _WatchConnection:
    ws: Any
    watcher: Watcher
    subs: dict[bytes, _KeyState] = field(default_factory=dict)
    close: tuple[int, str] | None = None


class Public:
    name = "public"

    def __init__(self, config: PublicConfig, storage: Mailbox[Any], filter_: Mailbox[Any],
                 metrics: Metrics, poller: Mailbox[Any] | None = None,
                 hub: Mailbox[Any] | None = None, mailbox: Mailbox[Any] | None = None) -> None:
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

    @property
    def draining(self) -> bool:
        return self._closing.is_set()

    def drain(self, reason: str) -> None:
        """Claims answer 503 with Retry-After from now on; watchers are closed (1001)."""
        if not self.draining:
            log.info("draining", reason=reason, watchers=len(self._connections))
        self._closing.set()

    async def stop(self) -> None:
        """Close websockets first (1001), then stop intake: hypercorn lets in-flight requests
        finish within the grace period."""
        self.drain("stopping")
        with trio.move_on_after(min(2.0, self.config.grace)):
            await self._no_watchers.wait()
        self._stop.set()

    async def _serve_commands(self) -> None:
        assert self.mailbox is not None
        env: Envelope[Any]
        async for env in self.mailbox.inbox:
            if isinstance(env.msg, Drain):
                self.drain(env.msg.reason)
                env.reply({"draining": True, "watchers_closing": len(self._connections)})

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config
        # The public socket serves the public API: readable by any local user (a proxy).
        with listening_socket(unix_path=cfg.unix_socket, mode=0o666, host=cfg.host,
                              port=cfg.port) as sock:
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
                        max_connections=self.config.max_connections)
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
        conn = _WatchConnection(ws, Watcher.create())
        if not self._connections:
            self._no_watchers = trio.Event()
        self._connections.add(conn)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_loop, conn)
                nursery.start_soon(self._write_loop, conn)
                nursery.start_soon(self._guard, conn, nursery.cancel_scope)
        finally:
            self._connections.discard(conn)
            if not self._connections:
                self._no_watchers.set()
            try:
                self.hub.tell(Drop(conn.watcher))
            except AnonTicketError:
                pass
        if conn.close is not None:
            with trio.move_on_after(1.0):
                await ws.close(*conn.close)

    async def _guard(self, conn: _WatchConnection, scope: trio.CancelScope) -> None:
        """Close the connection when it falls behind or the server drains."""
        async with trio.open_nursery() as nursery:
            async def on(event: trio.Event, code: int, reason: str) -> None:
                await event.wait()
                conn.close = (code, reason)
                nursery.cancel_scope.cancel()
            nursery.start_soon(on, conn.watcher.slow, SLOW_CONSUMER, "slow consumer")
            nursery.start_soon(on, self._closing, GOING_AWAY, "server draining")
        scope.cancel()

    async def _send(self, conn: _WatchConnection, message: dict[str, Any]) -> None:
        with trio.move_on_after(self.config.watch_send_timeout) as timeout:
            await conn.ws.send(json.dumps(message, separators=(",", ":")))
        if timeout.cancelled_caught:
            conn.watcher.slow.set()

    async def _read_loop(self, conn: _WatchConnection) -> None:
        queue = conn.watcher.send
        while True:
            text = await conn.ws.receive()
            try:
                req = parse_request(text)
                if req.op == "ping":
                    await queue.send(("send", {"type": "pong"}))
                elif req.op == "subscribe":
                    await self._subscribe(conn, req)
                else:
                    assert req.key is not None
                    if conn.subs.pop(req.key.raw, None) is not None:
                        assert self.hub is not None
                        await self.hub.ask(Unsubscribe(conn.watcher, req.key.raw),
                                           self.config.request_timeout)
            except InvalidInput as exc:
                await queue.send(("send", error_message(str(exc))))
            except NotFound:
                await queue.send(("send", error_message(NOT_FOUND)))
            except Unavailable:
                await queue.send(("send", error_message("service temporarily unavailable")))

    async def _subscribe(self, conn: _WatchConnection, req: WatchRequest) -> None:
        assert req.key is not None and self.hub is not None
        key, raw, timeout = req.key, req.key.raw, self.config.request_timeout
        if raw in conn.subs:
            raise InvalidInput("invalid request: already subscribed")
        if len(conn.subs) >= MAX_SUBSCRIPTIONS:
            raise InvalidInput(f"invalid request: at most {MAX_SUBSCRIPTIONS} subscriptions "
                               "per connection")
        # Register first, then read the state: nothing committed in between is lost, and
        # what the state already covers (seq <= n) is dropped when it arrives.
        conn.subs[raw] = _KeyState(key)
        try:
            await self.hub.ask(Subscribe(conn.watcher, raw), timeout)
            state: TicketState = await self.storage.ask(
                ReadTicketState(pid=key.pid, token=key.token), timeout)
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
        await conn.watcher.send.send(("ready", raw, state, replay, gap))

    async def _write_loop(self, conn: _WatchConnection) -> None:
        async for item in conn.watcher.receive:
            kind = item[0]
            if kind == "send":
                await self._send(conn, item[1])
                continue
            ks = conn.subs.get(item[1])
            if ks is None:
                continue  # unsubscribed meanwhile
            if kind == "ready":
                _, _, state, replay, gap = item
                if gap:
                    await self._send(conn, gap_message(ks.key))
                if replay is not None:
                    for event in replay:
                        await self._send(conn, event_message(ks.key, event))
                else:
                    await self._send(conn, state_message(ks.key, state))
                ks.seq = state.seq
                pending, ks.pending = ks.pending, []
                for held in pending:
                    await self._forward(conn, ks, held)
            elif ks.seq is None:
                ks.pending.append(item)  # until its state is out
            else:
                await self._forward(conn, ks, item)

    async def _forward(self, conn: _WatchConnection, ks: _KeyState, item: tuple[Any, ...]
                       ) -> None:
        if item[0] == "event":
            event = item[2]
            assert ks.seq is not None
            if event.seq <= ks.seq:
                return  # already covered by the state or the replay
            ks.seq = event.seq
            await self._send(conn, event_message(ks.key, event))
        else:
            await self._send(conn, note_message(ks.key, item[2]))

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
                    result: Claimed | Presence = await filter_.ask(Redeem(pid), timeout)
                except NotFound:  # the Bloom filter said maybe; storage knows better
                    metrics.redeem_bloom_db_miss.inc()
                    raise
                if result is Presence.ABSENT:
                    outcomes["not_found"].inc()
                    return json_error(404, NOT_FOUND)
                assert isinstance(result, Claimed)
            except AnonTicketError as exc:
                outcomes[_outcome(exc)].inc()
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
                return error_response(exc)
            token_counter.labels("token", "ok").inc()
            return json_response({
                "status": "revoked" if info.revoked else "active",
                "amount": info.amount,
                "issued_at": info.issued_at,
                "revoked_at": info.revoked_at,
                "abuse_score": info.abuse_score,
            })

        async def chain_status() -> dict[str, Any] | None:
            if self.poller is None:
                return None
            try:
                status: dict[str, Any] = await self.poller.ask(PollerStatus(), 1.0)
            except AnonTicketError:
                return None
            return status

        @app.get("/api/v1/info")
        async def info() -> Response:
            primary, network = cfg.primary_address, cfg.network
            if primary is None:
                status = await chain_status()
                primary = status["primary_address"] if status else None
                network = network_of(primary) if primary else None
            return json_response({
                "network": network,
                "primary_address": primary,
                "min_confirmations": cfg.min_confirmations,
                "min_payment_amount": cfg.min_payment_amount,
                "version": __version__,
            })

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
            body: dict[str, Any] = {"status": "ok", "actors": actors}
            if self.poller is not None:
                chain = await chain_status()
                body["chain"] = chain
                if chain is None or chain["state"] != "ok":
                    body["status"] = "degraded"  # redemption of recorded payments still works
            return json_response(body)

        return app


def _outcome(exc: AnonTicketError) -> str:
    if isinstance(exc, InvalidInput):
        return "invalid"
    if isinstance(exc, NotFound):
        return "not_found"
    if isinstance(exc, Unavailable):
        return "unavailable"
    return "error"
