"""What operators (and health checks) ask of the running service: commands that change how it
runs, and the status they read. Domain facts and the requests about them are
anon_ticket/domain/messages.py's.

Status reads answer `Figures`: JSON-ready numbers, shown as they are on the internal socket
(`/admin/status`, `/admin/bloom`) and in `/healthz`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from anon_ticket.domain.messages import Request

Figures = dict[str, Any]

# --- storage -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BackupDone:
    path: str
    bytes: int
    seconds: float


@dataclass(frozen=True, slots=True)
class Backup(Request[BackupDone]):
    """Write a consistent copy of the database and the token secret (off the loop)."""

    path: str


@dataclass(frozen=True, slots=True)
class StorageStats(Request[Figures]):
    pass


@dataclass(frozen=True, slots=True)
class StorageHealth(Request[Figures]):
    """Can storage write? Answered at once, outside any transaction: `{"writable": bool,
    "error": str | None}`. While the last write transaction failed, asking probes with a
    tiny write (at most once a second), so health recovers without waiting for a claim."""


# --- filter and hub ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FilterStats(Request[Figures]):
    pass


@dataclass(frozen=True, slots=True)
class HubStats(Request[dict[str, int]]):
    pass


# --- poller: each answers the poller's status ----------------------------------------------


@dataclass(frozen=True, slots=True)
class PollerStatus(Request[Figures]):
    pass


@dataclass(frozen=True, slots=True)
class PausePoller(Request[Figures]):
    pass


@dataclass(frozen=True, slots=True)
class ResumePoller(Request[Figures]):
    pass


@dataclass(frozen=True, slots=True)
class RescanFrom(Request[Figures]):
    """Scan again from this height on (I1 makes it harmless); answered once the new cursor
    is committed."""

    height: int


# --- public --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Drain(Request[Figures]):
    """Stop taking claims (503 with Retry-After) and close watchers; in-flight work finishes."""

    reason: str = "draining"


# --- the supervision tree (supervisors/tree.py answers them for the root supervisor) -------


@dataclass(frozen=True, slots=True)
class ActorState:
    name: str
    state: str
    uptime_secs: float | None
    restarts: int
    last_error: str | None
    mailbox_depth: int | None
    children: tuple[ActorState, ...] = field(default=())


@dataclass(frozen=True, slots=True)
class TreeStatus(Request[tuple[ActorState, ...]]):
    pass


@dataclass(frozen=True, slots=True)
class RestartActor(Request[bool]):
    name: str


@dataclass(frozen=True, slots=True)
class Shutdown(Request[bool]):
    reason: str


# --- worker processes ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkerMetrics(Request[str]):
    """A worker process's metrics, in Prometheus' text format (the owner's /metrics merges
    them, each sample labelled with its worker)."""

