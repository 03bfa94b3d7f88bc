"""The internal listener: operators only (I9), on a unix socket (0600 in a 0700 directory).

Loopback TCP is allowed as in the original (with a start-up warning unless a bearer token is
set); a non-loopback bind requires the token (checked by the configuration). HTTP, so operators
can use `curl --unix-socket`. Every state-changing command is logged as an audit line.

Every operator input is checked here, with a 400 that says what is wrong, before it reaches
an actor (which checks again rather than crash). A 503 here says why: only operators read it.
"""

from __future__ import annotations

import hmac
import os
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from quart import Response, request
from quart_trio import QuartTrio

from anon_ticket.backup import check_destination
from anon_ticket.domain.commands import (
    ActorState,
    Backup,
    Drain,
    Figures,
    FilterStats,
    PausePoller,
    PollerStatus,
    RescanFrom,
    RestartActor,
    ResumePoller,
    Shutdown,
    StorageStats,
    TreeStatus,
    WorkerMetrics,
)
from anon_ticket.domain.ids import ServiceToken
from anon_ticket.domain.inboxes import (
    FilterMsg,
    HubMsg,
    PollerMsg,
    PublicMsg,
    StorageMsg,
    SupervisorMsg,
    WorkerMsg,
)
from anon_ticket.domain.messages import MAX_HEIGHT, ListSkipped, Revoke
from anon_ticket.errors import AnonTicketError, InvalidInput, Unavailable
from anon_ticket.fdlimit import INTERNAL_CONNECTIONS
from anon_ticket.logs import get_logger
from anon_ticket.metrics import Metrics, merged_exposition
from anon_ticket.web import (
    describe_socket,
    json_error,
    json_response,
    listening_socket,
    new_app,
    read_json_object,
    serve_app,
)
from mailboxes import AnyMailbox, Mailbox

log = get_logger("internal")

I16 = (-32768, 32767)
LIMIT = re.compile(r"[0-9]{1,5}")
ACTOR_NAME = re.compile(r"[a-z][a-z0-9-]{0,31}")  # storage, worker-2, ...
MAX_PATH_BYTES = 4096  # PATH_MAX


def _text(value: str) -> bool:
    """Printable text SQLite can store: no control characters, no lone surrogates."""
    return not any(unicodedata.category(c) in ("Cc", "Cs") for c in value)


def _file_name(path: str) -> bool:
    try:
        raw = os.fsencode(path)
    except UnicodeError:  # a lone surrogate that no byte stands for
        return False
    return b"\0" not in raw and len(raw) <= MAX_PATH_BYTES


def _only(data: dict[str, Any], *allowed: str) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        takes = ", ".join(f"`{a}`" for a in allowed) or "no fields"
        raise InvalidInput(f"invalid request: unknown field `{unknown[0]}` (this command takes "
                           f"{takes})")


@dataclass(frozen=True, slots=True)
class InternalConfig:
    unix_socket: Path | None
    host: str | None
    port: int | None
    token: str | None
    max_body_bytes: int
    request_timeout: float
    grace: float


def state_json(s: ActorState) -> dict[str, Any]:
    return {
        "name": s.name,
        "state": s.state,
        "uptime_secs": None if s.uptime_secs is None else round(s.uptime_secs, 3),
        "restarts": s.restarts,
        "last_error": s.last_error,
        "mailbox_depth": s.mailbox_depth,
        "children": [state_json(c) for c in s.children],
    }


class Internal:
    name = "internal"

    def __init__(self, config: InternalConfig, *, storage: Mailbox[StorageMsg],
                 filter_: Mailbox[FilterMsg], supervisor: Mailbox[SupervisorMsg],
                 mailboxes: Mapping[str, AnyMailbox], metrics: Metrics,
                 poller: Mailbox[PollerMsg] | None = None,
                 public: Mailbox[PublicMsg] | None = None,
                 hub: Mailbox[HubMsg] | None = None,
                 workers: Mapping[int, Mailbox[WorkerMsg]] | None = None) -> None:
        self.workers = workers or {}  # worker processes (docs/architecture.md §8)
        self.poller = poller
        self.public = public
        self.hub = hub
        self.config = config
        self.storage = storage
        self.filter = filter_
        self.supervisor = supervisor
        self.mailboxes = mailboxes
        self.metrics = metrics
        self._stop = trio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config
        with listening_socket(unix_path=cfg.unix_socket, mode=0o600, dir_mode=0o700,
                              host=cfg.host, port=cfg.port) as sock:
            log.info("internal listener serving", address=describe_socket(sock))
            await serve_app(self.create_app(), sock, grace=cfg.grace,
                            shutdown=self._stop.wait, task_status=task_status,
                            max_connections=INTERNAL_CONNECTIONS,
                            stats=(self.metrics, "internal"))

    def create_app(self) -> QuartTrio:
        app = new_app("anon_ticket.internal", max_body_bytes=self.config.max_body_bytes)

        @app.errorhandler(Unavailable)
        async def _unavailable(exc: Unavailable) -> Response:
            # The public listener never says why; an operator should know (which actor is
            # down, that the wallet's height is not known yet).
            return json_error(503, str(exc) or "service temporarily unavailable",
                              exc.retry_after)

        cfg = self.config
        timeout = cfg.request_timeout
        expected = f"Bearer {cfg.token}".encode() if cfg.token else None

        @app.before_request
        async def _auth() -> Response | None:
            if expected is None:
                return None
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return json_error(401, "unauthorized")
            return None

        async def body() -> dict[str, Any]:
            if not await request.get_data(cache=True):
                return {}
            return await read_json_object(request)

        @app.get("/metrics")
        async def metrics() -> Response:
            for name, mb in self.mailboxes.items():
                self.metrics.mailbox_depth.labels(name).set(mb.depth)
            if not self.workers:
                return Response(generate_latest(self.metrics.registry), status=200,
                                content_type=CONTENT_TYPE_LATEST)
            texts: dict[int, str] = {}

            async def scrape(index: int, mailbox: Mailbox[WorkerMsg]) -> None:
                try:
                    texts[index] = await mailbox.ask(WorkerMetrics(), 2.0)
                except AnonTicketError:
                    pass  # restarting: its samples are missing from this scrape

            async with trio.open_nursery() as nursery:
                for index, mailbox in self.workers.items():
                    nursery.start_soon(scrape, index, mailbox)
            self.metrics.workers_scraped.set(len(texts))
            return Response(merged_exposition(self.metrics.registry, texts), status=200,
                            content_type=CONTENT_TYPE_LATEST)

        @app.post("/api/v1/token/<token>/revoke")
        async def revoke(token: str) -> Response:
            tok = ServiceToken.parse(token)
            data = await body()
            reason = data.get("reason")
            score = data.get("abuse_score")
            if reason is not None and (not isinstance(reason, str) or len(reason) > 1024
                                       or not _text(reason)):
                raise InvalidInput("invalid request: `reason` must be text of at most 1024 "
                                   "characters, without control characters")
            if score is not None and (type(score) is not int or not I16[0] <= score <= I16[1]):
                raise InvalidInput("invalid request: `abuse_score` must be an integer "
                                   "from -32768 to 32767")
            info = await self.storage.ask(Revoke(tok, reason, score), timeout)
            log.info("audit: revoke", token=tok.redacted(), abuse_score=info.abuse_score)
            return json_response({
                "status": "revoked", "amount": info.amount, "issued_at": info.issued_at,
                "revoked_at": info.revoked_at, "abuse_score": info.abuse_score,
                "reason": info.revoke_reason,
            })

        @app.get("/admin/status")
        async def status() -> Response:
            tree = await self.supervisor.ask(TreeStatus(), timeout)
            try:
                stats = await self.storage.ask(StorageStats(), timeout)
            except AnonTicketError as exc:
                stats = {"error": str(exc)}
            chain: Figures | None = None
            if self.poller is not None:
                try:
                    chain = await self.poller.ask(PollerStatus(), timeout)
                except AnonTicketError as exc:
                    chain = {"error": str(exc)}
            return json_response({"actors": [state_json(s) for s in tree], "storage": stats,
                                  "poller": chain})

        def poller() -> Mailbox[PollerMsg]:
            if self.poller is None:
                raise InvalidInput("no poller runs in this process")
            return self.poller

        async def no_fields() -> None:
            _only(await body())

        @app.post("/admin/poller/pause")
        async def pause() -> Response:
            await no_fields()
            return json_response(await poller().ask(PausePoller(), timeout))

        @app.post("/admin/poller/resume")
        async def resume() -> Response:
            await no_fields()
            return json_response(await poller().ask(ResumePoller(), timeout))

        @app.post("/admin/poller/rescan")
        async def rescan() -> Response:
            data = await body()
            _only(data, "from_height")
            height = data.get("from_height")
            if type(height) is not int or not 0 <= height <= MAX_HEIGHT:
                raise InvalidInput("invalid request: `from_height` must be a non-negative "
                                   "integer (a block height)")
            # The poller refuses a height above the wallet's (it knows it).
            return json_response(await poller().ask(RescanFrom(height), timeout))

        @app.get("/admin/bloom")
        async def bloom() -> Response:
            return json_response(await self.filter.ask(FilterStats(), timeout))

        @app.get("/admin/skipped")
        async def skipped() -> Response:
            raw = request.args.get("limit", "100")
            if not LIMIT.fullmatch(raw) or not 1 <= int(raw) <= 10_000:
                raise InvalidInput("invalid request: limit must be an integer from 1 to 10000")
            rows = await self.storage.ask(ListSkipped(int(raw)), timeout)
            return json_response({"skipped": [
                {"txid": r.txid, "reason": r.reason, "amount": r.amount, "height": r.height,
                 "recorded_at": r.recorded_at} for r in rows]})

        @app.post("/admin/backup")
        async def backup() -> Response:
            data = await body()
            _only(data, "path")
            path = data.get("path")
            if not isinstance(path, str) or not path.startswith("/"):
                raise InvalidInput("invalid request: `path` must be an absolute path")
            if not _file_name(path):
                raise InvalidInput("invalid request: `path` must be a file name without NUL "
                                   f"characters, at most {MAX_PATH_BYTES} bytes")
            # An existing directory, no special file system or file (off the loop: a stat
            # may hang on a network file system); storage checks again.
            dest = await trio.to_thread.run_sync(check_destination, Path(path))
            log.info("audit: backup", path=str(dest))
            done = await self.storage.ask(Backup(str(dest)), max(timeout, 600.0))
            return json_response({"path": done.path, "bytes": done.bytes,
                                  "seconds": round(done.seconds, 3)})

        @app.post("/admin/actors/<name>/restart")
        async def restart(name: str) -> Response:
            await no_fields()
            if not ACTOR_NAME.fullmatch(name):
                raise InvalidInput("invalid request: an actor's name is lowercase letters, "
                                   "digits and dashes, like storage, poller or worker-2")
            await self.supervisor.ask(RestartActor(name), timeout)
            return json_response({"restarted": name})

        @app.post("/admin/drain")
        async def drain() -> Response:
            await no_fields()
            log.info("audit: drain")
            if self.workers:  # every worker process drains its own listener
                answers: list[Figures] = []

                async def drain_one(mailbox: Mailbox[WorkerMsg]) -> None:
                    answers.append(await mailbox.ask(Drain("operator command"), timeout))

                async with trio.open_nursery() as nursery:
                    for mailbox in self.workers.values():
                        nursery.start_soon(drain_one, mailbox)
                return json_response({"draining": True, "workers": len(answers),
                                      "watchers_closing": sum(a.get("watchers_closing", 0)
                                                              for a in answers)})
            if self.public is None:
                raise InvalidInput("no public listener runs in this process")
            return json_response(await self.public.ask(Drain("operator command"), timeout))

        @app.post("/admin/shutdown")
        async def shutdown() -> Response:
            await no_fields()
            await self.supervisor.ask(Shutdown("operator command"), timeout)
            return json_response({"status": "shutting down"})

        return app
