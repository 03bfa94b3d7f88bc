"""The supervision tree of one anon-ticket process, read top to bottom.

```
root (one-for-one)
├── devchain       only with --dev-chain: monerod --regtest + wallet-rpcs as child processes
├── core (rest-for-one: the filter is fed by storage, so it restarts after it)
│   ├── storage    single writer, group commit (SQLite, or PostgreSQL: actors/storage_pg.py)
│   ├── filter     Bloom filter + positive cache, prewarmed from the database
│   └── cluster    PostgreSQL only: other nodes' commits in, this node's announced to all
├── hub            fans committed events and announcements out to websocket watchers
├── poller         watches monero-wallet-rpc; records deep transfers through storage
│                  (PostgreSQL: only on the node holding the poller lock, supervisors/leadership.py)
├── public         redeem, token, info, watch (websocket), healthz (serves once core is ready)
└── internal       unix socket: metrics, revoke, admin commands
```

Before anything starts: the signal receiver opens (a stop during start-up is graceful), the
data directory is locked, and the schema is migrated. Exit codes: 0 after a graceful stop,
1 when the root supervisor escalates, 2 for a configuration error.
"""

from __future__ import annotations

import gc
import os
import secrets
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import apsw
import trio

from actors.cluster import Cluster, ClusterConfig
from actors.devchain import DevChainActor
from actors.fanout import Fanout
from actors.filter import Filter, FilterConfig
from actors.hub import Hub
from actors.internal import Internal, InternalConfig
from actors.poller import Poller, PollerConfig
from actors.public import Public, PublicConfig
from actors.storage import Storage, StorageConfig
from actors.storage_pg import PgConfig, PgStorage
from actors.worker import SharedListener, WorkerConfig, WorkerProcess
from anon_ticket import fdlimit, gctune, schema
from anon_ticket.config import Settings, settings_to_json
from anon_ticket.datadir import DataDir
from anon_ticket.devchain import DevChain, plan_ports
from anon_ticket.devcli import DEVCHAIN_DIR
from anon_ticket.domain.address import validate_primary
from anon_ticket.domain.commands import ActorState, RestartActor, Shutdown, TreeStatus
from anon_ticket.domain.inboxes import (
    ClusterMsg,
    FanoutMsg,
    FilterMsg,
    HubMsg,
    PollerMsg,
    PublicMsg,
    StorageMsg,
    SupervisorMsg,
    WorkerMsg,
)
from anon_ticket.domain.tokens import Derivation
from anon_ticket.errors import (
    AnonTicketError,
    ConfigError,
    DataDirLocked,
    InvalidAddress,
    NotFound,
    StorageError,
)
from anon_ticket.logs import get_logger
from anon_ticket.metrics import Metrics
from anon_ticket.walletrpc import JsonRpc, WalletIdentity, WalletRpc
from mailboxes import AnyMailbox, Dispatch, Envelope, Mailbox
from supervisors.leadership import Leadership
from supervisors.supervisor import (
    Backoff,
    ChildSpec,
    ChildState,
    Commands,
    Escalation,
    NoSuchChild,
    Runnable,
    Strategy,
    Supervisor,
)

log = get_logger("tree")

DEV_NETWORK = "regtest"

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2


@dataclass
class Mailboxes:
    storage: Mailbox[StorageMsg] = field(
        default_factory=lambda: Mailbox[StorageMsg]("storage", 8192))
    poller: Mailbox[PollerMsg] = field(default_factory=lambda: Mailbox[PollerMsg]("poller", 64))
    hub: Mailbox[HubMsg] = field(default_factory=lambda: Mailbox[HubMsg]("hub", 65536))
    public: Mailbox[PublicMsg] = field(default_factory=lambda: Mailbox[PublicMsg]("public", 64))
    filter: Mailbox[FilterMsg] = field(
        default_factory=lambda: Mailbox[FilterMsg]("filter", 65536))
    root: Mailbox[SupervisorMsg] = field(
        default_factory=lambda: Mailbox[SupervisorMsg]("supervisor", 64))
    fanout: Mailbox[FanoutMsg] = field(
        default_factory=lambda: Mailbox[FanoutMsg]("fanout", 65536))
    cluster: Mailbox[ClusterMsg] = field(
        default_factory=lambda: Mailbox[ClusterMsg]("cluster", 65536))
    workers: dict[int, Mailbox[WorkerMsg]] = field(default_factory=dict)

    def by_name(self) -> dict[str, AnyMailbox]:
        return {"storage": self.storage, "filter": self.filter, "poller": self.poller,
                "hub": self.hub}


@dataclass
class Tree:
    root: Supervisor
    mailboxes: Mailboxes
    metrics: Metrics
    closers: list[Callable[[], None]] = field(default_factory=list)  # after the tree stops


def _nested_status(actor: Runnable) -> tuple[ChildState, ...]:
    assert isinstance(actor, Supervisor)
    return actor.status()


def _actor_states(states: tuple[ChildState, ...]) -> tuple[ActorState, ...]:
    return tuple(ActorState(s.name, s.state, s.uptime_secs, s.restarts, s.last_error,
                            s.mailbox_depth, _actor_states(s.children)) for s in states)


# The operator's commands to the root supervisor, answered with its own interface: it knows
# no application message or error (docs/architecture.md §2). Audit lines keep its name.
supervisor_log = get_logger("supervisor")


async def _serve_root_commands(mailbox: Mailbox[SupervisorMsg], root: Supervisor) -> None:
    def status(env: Envelope[TreeStatus]) -> None:
        env.reply(_actor_states(root.status()))

    def restart(env: Envelope[RestartActor]) -> None:
        try:
            root.restart_child(env.msg.name)
        except NoSuchChild as exc:
            env.fail(NotFound(str(exc)))
            return
        supervisor_log.info("audit: restart actor", child=env.msg.name)
        env.reply(True)

    def shutdown(env: Envelope[Shutdown]) -> None:
        supervisor_log.info("audit: shutdown", reason=env.msg.reason)
        env.reply(True)
        root.request_stop(env.msg.reason)

    await mailbox.serve(Dispatch(mailbox.name, {
        TreeStatus: status, RestartActor: restart, Shutdown: shutdown}))


def _stop_worker(actor: Runnable) -> None:
    assert isinstance(actor, WorkerProcess)
    actor.stop()


async def _stop_listener(actor: Runnable) -> None:
    if isinstance(actor, Public):
        await actor.stop()  # websockets first (1001), then the HTTP grace wait
    else:
        assert isinstance(actor, Internal)
        actor.stop()


def _network(settings: Settings) -> str | None:
    network = None
    if settings.primary_address:
        try:
            network = validate_primary(settings.primary_address)
        except InvalidAddress as exc:
            raise ConfigError([f"primary_address: {exc}"]) from None
    if settings.dev_chain:
        # A regtest wallet's addresses carry mainnet's prefixes: say what the chain is.
        network = DEV_NETWORK
    return network


def filter_config(settings: Settings) -> FilterConfig:
    return FilterConfig(
        db_path=settings.database_path,
        bloom_entries=settings.pid_bloom_entries,
        bloom_fp_rate=settings.pid_bloom_fp_rate,
        cache_ttl=settings.pid_cache_ttl_secs,
        cache_capacity=settings.pid_cache_capacity,
        postgres_url=settings.postgres_url,
    )


def node_name(settings: Settings) -> str:
    """This node's name among several on one PostgreSQL database: set, or the host's name
    and a random suffix (a restarted node is a new one: what it applied starts over)."""
    if settings.node_name:
        return settings.node_name
    host = "".join(c if c.isalnum() or c in "._-" else "-" for c in socket.gethostname())
    return f"{host[:48] or 'node'}-{secrets.token_hex(3)}"


def public_config(settings: Settings, network: str | None,
                  inherited_fd: int | None = None, worker: int | None = None) -> PublicConfig:
    cap = fdlimit.connection_cap(settings.max_connections)
    return PublicConfig(
        host=settings.bind_host,
        port=settings.bind_port,
        unix_socket=settings.unix_socket,
        max_body_bytes=settings.max_body_bytes,
        request_timeout=settings.request_timeout_secs,
        grace=settings.grace_secs,
        network=network,
        primary_address=settings.primary_address,
        min_confirmations=settings.min_confirmations,
        min_payment_amount=settings.min_payment_amount,
        watch_send_timeout=settings.watch_send_timeout_secs,
        max_connections=cap,
        max_watchers=min(10_000, cap),
        keep_alive=settings.keep_alive_secs,
        read_timeout=settings.read_timeout_secs,
        write_timeout=settings.write_timeout_secs,
        unknown_rate=settings.unknown_rate_per_sec,
        inherited_fd=inherited_fd,
        worker=worker,
    )


def worker_count(settings: Settings) -> int:
    """How many worker processes serve the public listener (1: none, the single process)."""
    return settings.workers or os.cpu_count() or 1


def build_tree(settings: Settings, secret: bytes, *,
               storage_factory: Callable[..., Storage] = Storage,
               on_open: Callable[[apsw.Connection], None] | None = None,
               events: Mailbox[HubMsg] | None = None) -> Tree:
    """Wire the actors; `storage_factory` and `on_open` are seams for fault-injection tests,
    `events` receives the poller's announcements (until the hub consumes them)."""
    network = _network(settings)
    mb = Mailboxes()
    metrics = Metrics()
    metrics.disk.paths.update(data=settings.data_dir, database=settings.database_path.parent)
    backoff = Backoff(settings.backoff_initial_secs, settings.backoff_max_secs)
    limits = dict(intensity=settings.restart_intensity, period=settings.restart_period_secs,
                  backoff=backoff, grace=settings.grace_secs,
                  on_restart=lambda name: metrics.restarts.labels(name).inc())

    storage_cfg = StorageConfig(
        db_path=settings.database_path,
        secret=secret,
        secret_path=DataDir(settings.data_dir).secret_path,
        derivation=Derivation(settings.token_derivation),
        batch_limit=settings.batch_limit,
    )
    filter_cfg = filter_config(settings)
    public_cfg = public_config(settings, network)
    internal_host, internal_port = settings.internal_bind or (None, None)
    internal_cfg = InternalConfig(
        unix_socket=settings.internal_socket_path,
        host=internal_host,
        port=internal_port,
        token=settings.internal_token,
        max_body_bytes=settings.max_body_bytes,
        request_timeout=settings.request_timeout_secs,
        grace=settings.grace_secs,
    )

    workers = worker_count(settings)
    replicas = mb.fanout if workers > 1 else None
    pg_url = settings.postgres_url
    node = node_name(settings)
    core_children = [
        ChildSpec("storage", lambda: storage_factory(
            storage_cfg, mb.storage, mb.filter, metrics, on_open=on_open), mb.storage),
        ChildSpec("filter", lambda: Filter(filter_cfg, mb.filter, metrics, mb.storage,
                                           hub=mb.hub, replicas=replicas), mb.filter),
    ]
    if pg_url is not None:
        # docs/architecture.md §9: several nodes, one PostgreSQL database.
        if storage_factory is Storage:
            storage_factory = partial(PgStorage, pg=PgConfig(pg_url, node), cluster=mb.cluster)
        cluster_cfg = ClusterConfig(pg_url, node, request_timeout=settings.request_timeout_secs)
        core_children.append(ChildSpec("cluster", lambda: Cluster(
            cluster_cfg, mb.cluster, mb.filter, metrics), mb.cluster))
    core = ChildSpec(
        "core",
        lambda: Supervisor("core", core_children, strategy=Strategy.REST_FOR_ONE,
                           **limits),  # type: ignore[arg-type]
        status=_nested_status,
    )
    poller_cfg = PollerConfig(
        min_confirmations=settings.min_confirmations,
        min_payment_amount=settings.min_payment_amount,
        poll_interval=settings.poll_interval_secs,
        start_height=settings.start_height,
        expected_primary=settings.primary_address,
        request_timeout=settings.request_timeout_secs,
        window_blocks=settings.scan_window_blocks,
    )
    rpc_url, rpc_login = settings.monero_rpc_url, settings.monero_rpc_login
    devchain = None
    if settings.dev_chain:
        root_dir = settings.data_dir / DEVCHAIN_DIR
        ports = plan_ports()
        devchain = ChildSpec("devchain", lambda: DevChainActor(root_dir, ports,
                                                               grace=settings.grace_secs))
        rpc_url, rpc_login = DevChain(root_dir, ports).watch_wallet_url, None
    poller = None
    if rpc_url is not None:
        url: str = rpc_url

        def make_wallet() -> WalletRpc:
            return WalletRpc(JsonRpc(url, login=rpc_login, timeout_cap=settings.rpc_timeout_secs))

        async def identify() -> WalletIdentity:
            wallet = make_wallet()
            try:
                return await wallet.identity()
            finally:
                await wallet.aclose()

        def make_poller() -> Poller:
            return Poller(
                poller_cfg, make_wallet, mb.poller, mb.storage, metrics,
                # (PostgreSQL: through storage, into the cluster feed for every node's hub)
                events=events or (mb.storage if pg_url is not None else mb.hub))

        if pg_url is None:
            metrics.poller_leader.set(1)  # one node: it always leads
            poller = ChildSpec("poller", make_poller, mb.poller)
        else:
            lead_url: str = pg_url
            poller = ChildSpec("poller", lambda: Leadership(
                lead_url, node, make_poller, mb.poller, metrics, identify=identify,
                expected_primary=settings.primary_address), mb.poller)
    hub = ChildSpec("hub", lambda: Hub(mb.hub, metrics, replicas=replicas), mb.hub)
    public = ChildSpec("public", lambda: Public(public_cfg, mb.storage, mb.filter, metrics,
                                                poller=mb.poller if poller else None,
                                                hub=mb.hub, mailbox=mb.public),
                       mb.public, stop=_stop_listener)
    closers: list[Callable[[], None]] = []
    front: list[ChildSpec] = []
    if workers > 1:
        # docs/architecture.md §8: the public listener runs in worker processes; this one
        # keeps storage, the poller, the hub and the internal socket.
        listener = SharedListener(unix_path=settings.unix_socket, host=settings.bind_host,
                                  port=settings.bind_port)
        closers.append(listener.close)
        worker_cfg = WorkerConfig(settings_json=settings_to_json(settings),
                                  request_timeout=settings.request_timeout_secs)
        targets: dict[str, Mailbox[Any]] = {"storage": mb.storage, "poller": mb.poller}

        def worker(index: int) -> ChildSpec:
            mailbox = mb.workers[index] = Mailbox[WorkerMsg](f"worker-{index}", 16)
            return ChildSpec(f"worker-{index}", lambda: WorkerProcess(
                index, worker_cfg, listener, targets, mb.fanout, mailbox), mailbox,
                stop=_stop_worker)

        fanout = ChildSpec("fanout", lambda: Fanout(
            mb.fanout, metrics, ack_timeout=settings.request_timeout_secs / 2), mb.fanout)
        front = [fanout, *(worker(i) for i in range(1, workers + 1))]
    internal = ChildSpec(
        "internal",
        lambda: Internal(internal_cfg, storage=mb.storage, filter_=mb.filter,
                         supervisor=mb.root, mailboxes=mb.by_name(), metrics=metrics,
                         poller=mb.poller if poller else None, public=mb.public,
                         hub=mb.hub, workers=mb.workers),
        stop=_stop_listener,
    )
    # Stopped in reverse: with workers, they go first (they drain their own connections),
    # then the fanout, then the owner's actors.
    listeners = [public, internal] if workers == 1 else [internal, *front]
    children = [*([devchain] if devchain else []), core, hub, *([poller] if poller else []),
                *listeners]
    commands = Commands(mb.root, partial(_serve_root_commands, mb.root))
    root = Supervisor("root", children, strategy=Strategy.ONE_FOR_ONE,
                      commands=commands, **limits)  # type: ignore[arg-type]
    return Tree(root, mb, metrics, closers)


async def _run_root(root: Supervisor, everything: trio.CancelScope, *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    await root.run(task_status=task_status)
    everything.cancel()  # the tree has stopped: so does the signal watcher


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


async def _watch_signals(signals: Any, root: Supervisor, everything: trio.CancelScope) -> None:
    async for signum in signals:
        name = signal.Signals(signum).name
        if root.stop_reason is None:
            log.info("stopping gracefully", signal=name)
            root.request_stop(name)
        else:
            log.warning("second signal: stopping now", signal=name)
            everything.cancel()
            return


async def run_server(settings: Settings, **tree_options: Any) -> int:
    """Run the whole process until a signal, a shutdown command or an escalation."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        fdlimit.raise_to_hard_limit()
        datadir = DataDir(settings.data_dir)
        try:
            datadir.ensure()
            lock = datadir.lock()
        except (DataDirLocked, StorageError) as exc:  # held, or not writable (read-only)
            log.error("cannot start", error=str(exc))
            return EXIT_CONFIG
        try:
            return await _run_locked(settings, datadir, signals, tree_options)
        finally:
            lock.release()


async def _run_locked(settings: Settings, datadir: DataDir, signals: Any,
                      tree_options: dict[str, Any]) -> int:
    try:
        if settings.postgres_url is not None:
            applied = schema.migrate_postgres(settings.postgres_url)
        else:
            applied = schema.migrate(settings.database_path)
        if applied:
            log.info("database migrated", applied=",".join(applied))
        secret = datadir.token_secret()
        tree = build_tree(settings, secret, **tree_options)
    except (ConfigError, StorageError) as exc:
        log.error("cannot start", error=str(exc))
        return EXIT_CONFIG
    log.info("starting", settings=" ".join(f"{k}={v}" for k, v in settings.describe().items()))
    if settings.internal_tcp_warning:
        log.warning("internal listener warning", detail=settings.internal_tcp_warning)
    gc_before: tuple[int, int, int] | None = None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_signals, signals, tree.root, nursery.cancel_scope)
            await nursery.start(_run_root, tree.root, nursery.cancel_scope)
            gc_before = gctune.settle()  # start-up frozen, young collections rarer
            gc.callbacks.append(tree.metrics.gc_times)
    except ConfigError as exc:
        log.error("cannot start", error=str(exc))
        return EXIT_CONFIG
    except BaseExceptionGroup as group:
        config, rest = group.split(ConfigError)
        if config is not None and rest is None:
            log.error("cannot start", error=str(_leaf(config)))
            return EXIT_CONFIG
        escalation, rest = group.split(Escalation)
        if escalation is not None:
            log.error("giving up", error=str(_leaf(escalation)))
            return EXIT_FAILURE
        raise
    except (Escalation, AnonTicketError) as exc:
        log.error("giving up", error=str(exc))
        return EXIT_FAILURE
    finally:
        for close in tree.closers:
            close()
        if tree.metrics.gc_times in gc.callbacks:
            gc.callbacks.remove(tree.metrics.gc_times)
        if gc_before is not None:
            gctune.restore(gc_before)
    log.info("stopped", reason=tree.root.stop_reason or "forced")
    return EXIT_OK
