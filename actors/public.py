"""The public listener: hypercorn (trio worker) + quart-trio, on TCP or a unix socket.

Routes are those of the original anon-ticket (DESIGN §4) plus `/api/v1/info` and `/healthz`.
No internal route is served here (I9). The redeem path asks the filter first (a Bloom negative
answers 404 with no storage work; a cached claim answers `already_claimed`), then storage.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from quart import Response, request
from quart_trio import QuartTrio

from anon_ticket import __version__
from anon_ticket.domain.address import network_of
from anon_ticket.domain.ids import PaymentId, ServiceToken
from anon_ticket.domain.messages import (
    Claim,
    Claimed,
    Lookup,
    LookupToken,
    PollerStatus,
    Presence,
)
from anon_ticket.errors import AnonTicketError, InvalidInput, NotFound, Unavailable
from anon_ticket.logs import get_logger
from anon_ticket.metrics import Metrics
from anon_ticket.web import (
    bind_tcp,
    bind_unix,
    describe_socket,
    error_response,
    install_error_handlers,
    json_error,
    json_response,
    read_json_object,
    serve_app,
)
from supervisors.mailbox import Mailbox

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


class Public:
    name = "public"

    def __init__(self, config: PublicConfig, storage: Mailbox[Any], filter_: Mailbox[Any],
                 metrics: Metrics, poller: Mailbox[Any] | None = None) -> None:
        self.config = config
        self.storage = storage
        self.filter = filter_
        self.poller = poller
        self.metrics = metrics
        self.draining = False
        self._stop = trio.Event()
        self.address: str | None = None

    def stop(self) -> None:
        """Stop intake; hypercorn lets in-flight requests finish within the grace period."""
        self.draining = True
        self._stop.set()

    def _bind(self) -> socket.socket:
        if self.config.unix_socket is not None:
            return bind_unix(self.config.unix_socket, 0o666)
        return bind_tcp(self.config.host, self.config.port)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        sock = self._bind()
        try:
            self.address = describe_socket(sock)
            log.info("public listener serving", address=self.address)
            app = self.create_app()
            await serve_app(app, sock, grace=self.config.grace, shutdown=self._stop.wait,
                            task_status=task_status)
            log.info("public listener stopped")
        finally:
            sock.close()
            if self.config.unix_socket is not None:
                self.config.unix_socket.unlink(missing_ok=True)

    # --- the app ----------------------------------------------------------------------------

    def create_app(self) -> QuartTrio:
        app = QuartTrio("anon_ticket.public")
        app.config["MAX_CONTENT_LENGTH"] = self.config.max_body_bytes
        install_error_handlers(app)
        cfg = self.config
        timeout = cfg.request_timeout
        metrics = self.metrics
        redeem_counter = metrics.redeem_requests
        storage, filter_ = self.storage, self.filter

        @app.post("/api/v1/redeem")
        async def redeem() -> Response:
            if self.draining:
                redeem_counter.labels("unavailable").inc()
                return json_error(503, "service is draining", 5)
            try:
                data = await read_json_object(request, cfg.max_body_bytes)
                if "pid" not in data:
                    raise InvalidInput("invalid request: missing field `pid`")
                pid = PaymentId.parse(data["pid"])
                hint = await filter_.ask(Lookup(pid), timeout)
                if hint is Presence.ABSENT:
                    redeem_counter.labels("not_found").inc()
                    return json_error(404, NOT_FOUND)
                if isinstance(hint, Claimed):
                    result: Claimed = hint
                else:
                    try:
                        result = await storage.ask(Claim(pid), timeout)
                    except NotFound:
                        metrics.redeem_bloom_db_miss.inc()
                        raise
            except AnonTicketError as exc:
                redeem_counter.labels(_outcome(exc)).inc()
                return error_response(exc)
            redeem_counter.labels(result.status.value).inc()
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
