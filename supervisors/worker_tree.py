"""A worker process's own actor tree (docs/architecture.md §8).

The link comes up first (the owner attaches it: from then on every new payment id reaches this
process), then, under a supervisor of the worker's own, the filter replica (it prewarms from
the database read-only, then applies what the link queued meanwhile), the hub and the public
listener on the inherited socket. The listener only starts once the filter serves.

The process ends when its link ends (the owner is gone, or gave it up) or on SIGTERM (the
owner's graceful stop: websockets closed, in-flight requests finished).
"""

from __future__ import annotations

import signal
import socket
from dataclasses import dataclass, field

import trio

from actors.filter import Filter
from actors.hub import Hub
from actors.link import Link
from actors.public import Public
from anon_ticket.config import Settings
from anon_ticket.domain.inboxes import FilterMsg, HubMsg, PollerMsg, PublicMsg, StorageMsg
from anon_ticket.logs import get_logger
from anon_ticket.metrics import Metrics
from anon_ticket.reads import Reader
from mailboxes import Mailbox
from supervisors.supervisor import Backoff, ChildSpec, Strategy, Supervisor
from supervisors.tree import _network, _stop_listener, filter_config, public_config

log = get_logger("worker")


@dataclass
class WorkerMailboxes:
    # storage and poller are the link's: their requests go to the owner's
    storage: Mailbox[StorageMsg] = field(default_factory=lambda: Mailbox[StorageMsg]("storage"))
    poller: Mailbox[PollerMsg] = field(default_factory=lambda: Mailbox[PollerMsg]("poller"))
    filter: Mailbox[FilterMsg] = field(
        default_factory=lambda: Mailbox[FilterMsg]("filter", 65536))
    hub: Mailbox[HubMsg] = field(default_factory=lambda: Mailbox[HubMsg]("hub", 65536))
    public: Mailbox[PublicMsg] = field(default_factory=lambda: Mailbox[PublicMsg]("public", 64))


def build_worker_tree(settings: Settings, index: int, link_sock: socket.socket,
                      public_fd: int) -> tuple[Link, Supervisor, Metrics]:
    mb = WorkerMailboxes()
    metrics = Metrics()
    # Local reads open the SQLite file; with PostgreSQL every read goes through the owner.
    reader = (Reader(str(settings.database_path))
              if settings.worker_reads == "local" and settings.postgres_url is None else None)
    link = Link(index, link_sock, storage=mb.storage, poller=mb.poller, filter_=mb.filter,
                hub=mb.hub, public=mb.public, metrics=metrics, reader=reader)
    filter_cfg = filter_config(settings)
    public_cfg = public_config(settings, _network(settings), inherited_fd=public_fd,
                               worker=index)
    children = [
        ChildSpec("filter", lambda: Filter(filter_cfg, mb.filter, metrics, mb.storage,
                                           hub=mb.hub), mb.filter),
        ChildSpec("hub", lambda: Hub(mb.hub, metrics), mb.hub),
        ChildSpec("public", lambda: Public(public_cfg, mb.storage, mb.filter, metrics,
                                           poller=mb.poller, hub=mb.hub, mailbox=mb.public),
                  mb.public, stop=_stop_listener),
    ]
    root = Supervisor(
        f"worker-{index}", children, strategy=Strategy.ONE_FOR_ONE,
        intensity=settings.restart_intensity, period=settings.restart_period_secs,
        backoff=Backoff(settings.backoff_initial_secs, settings.backoff_max_secs),
        grace=settings.grace_secs)
    return link, root, metrics


async def run_worker(settings: Settings, index: int, link_fd: int, public_fd: int) -> int:
    """Exit codes: 0 after a graceful stop, 1 when the link or the tree failed."""
    link_sock = socket.socket(fileno=link_fd)
    link, root, _ = build_worker_tree(settings, index, link_sock, public_fd)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            async def stop_on_signal() -> None:
                async for signum in signals:
                    log.info("stopping gracefully", worker=index,
                             signal=signal.Signals(signum).name)
                    root.request_stop("signal")

            async def run_root() -> None:
                await root.run()
                nursery.cancel_scope.cancel()  # stopped: the link goes with it

            await nursery.start(link.run)
            nursery.start_soon(stop_on_signal)
            nursery.start_soon(run_root)
    return 0
