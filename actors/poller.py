"""The chain poller: watches the operator's wallet through monero-wallet-rpc.

Each tick: `refresh`, `get_height`, then
1. crediting windows: `get_transfers` (`in`, `filter_by_height`) over bounded windows from the
   cursor to the deepest safe height, `min_height` exclusive (I5). Each window goes to storage
   with the new cursor in one transaction (I4), split at block boundaries so a long catch-up
   never holds the writer for long. Every height lands in exactly one crediting window.
2. one `get_transfers` (`in`, `pool`) over a recent window below the wallet height: pool and
   shallow transfers are announced (`payment_seen`, `confirmations`), never credited (I6);
   deep ones found there are ingested again (a transfer re-mined lower after a reorg still
   counts once, I1); a recorded transfer missing from it is declared vanished only if
   `get_transfer_by_txid` no longer knows it (I6).
Failures back off exponentially with jitter; the poller never exits on a wallet problem, and
redemption of recorded payments does not depend on it. Its status tells a wallet failure from
a storage one (a full disk is not the wallet's fault).

An operator's rescan is applied by the polling loop itself, between ticks: a tick in flight is
cancelled first, so its window's cursor (committed with the window) cannot overwrite the
rescan's. The command is answered once the new cursor is committed.
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import trio

from anon_ticket.domain.commands import (
    Figures,
    PausePoller,
    PollerStatus,
    RescanFrom,
    ResumePoller,
)
from anon_ticket.domain.ids import PaymentId
from anon_ticket.domain.inboxes import HubMsg, PollerMsg, StorageMsg
from anon_ticket.domain.messages import (
    MAX_HEIGHT,
    Confirmations,
    MarkVanished,
    PaymentSeen,
    PollerPauseFlag,
    ReadCursor,
    RecentTransfers,
    RecordTransfers,
    SightingGone,
    SkippedTransfer,
    Transfer,
)
from anon_ticket.domain.transfers import WalletTransfer, classify, sighting
from anon_ticket.errors import (
    AnonTicketError,
    ConfigError,
    InvalidInput,
    NotFound,
    RpcBusy,
    RpcError,
    RpcTimeout,
    RpcUnavailable,
    Unavailable,
)
from anon_ticket.logs import get_logger
from anon_ticket.metrics import Metrics
from anon_ticket.walletrpc import WalletIdentity, WalletRpc
from mailboxes import Asks, Dispatch, Envelope, Mailbox

log = get_logger("poller")

# Transfers per storage message. Claims wait behind a message while it runs (about 50 to 150
# ms on the 2-core development machine, fast day to slow one); smaller messages mean more
# COMMITs, each writing out pages all over the B-trees (256: 0.6x the ingestion rate).
CHUNK_TRANSFERS = 1024
SEEN_MEMORY = 10_000

R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class PollerConfig:
    min_confirmations: int
    min_payment_amount: int
    poll_interval: float
    start_height: int | None
    expected_primary: str | None
    request_timeout: float
    window_blocks: int = 1000
    backoff_initial: float = 1.0
    backoff_max: float = 60.0

    @property
    def reorg_window(self) -> int:
        return max(2 * self.min_confirmations, 20)


class _StorageFailed(Exception):
    """Storage could not answer the poller: not the wallet's fault."""

    def __init__(self, error: AnonTicketError) -> None:
        super().__init__(str(error))
        self.error = error


def chunks_at_block_boundaries(transfers: list[Transfer], skipped: list[SkippedTransfer],
                               window_top: int) -> list[RecordTransfers]:
    """Split one window into storage messages that each end on a whole block."""
    items: list[tuple[int, Transfer | SkippedTransfer]] = sorted(
        [(t.height, t) for t in transfers] + [(s.height, s) for s in skipped],
        key=lambda x: x[0])
    out: list[RecordTransfers] = []
    batch: list[Transfer | SkippedTransfer] = []
    for i, (height, item) in enumerate(items):
        batch.append(item)
        last_of_block = i + 1 == len(items) or items[i + 1][0] != height
        if len(batch) >= CHUNK_TRANSFERS and last_of_block and i + 1 < len(items):
            out.append(_message(batch, height))
            batch = []
    out.append(_message(batch, window_top))
    return out


def _message(batch: list[Transfer | SkippedTransfer], cursor: int) -> RecordTransfers:
    return RecordTransfers(
        tuple(x for x in batch if isinstance(x, Transfer)),
        tuple(x for x in batch if isinstance(x, SkippedTransfer)),
        cursor=cursor,
    )


class Poller:
    name = "poller"

    def __init__(self, config: PollerConfig, wallet: Callable[[], WalletRpc],
                 mailbox: Mailbox[PollerMsg], storage: Mailbox[StorageMsg], metrics: Metrics,
                 events: Mailbox[HubMsg] | Mailbox[StorageMsg] | None = None) -> None:
        self.config = config
        self.wallet = wallet()
        self.mailbox = mailbox
        self.storage = storage
        self.metrics = metrics
        self.events = events
        self.identity: WalletIdentity | None = None
        self.cursor: int | None = None
        self.wallet_height: int | None = None
        self.paused = False
        # The stored pause has been read, or a pause or resume since has decided it.
        self._pause_known = False
        self.last_success: float | None = None
        self.last_error: str | None = None
        self.wallet_error: str | None = None  # the wallet's last failure, until it is past
        self.storage_error: str | None = None  # recording failed, until a tick completes
        self._wallet_answered = False  # in this tick
        self.failures = 0
        self._wake = trio.Event()
        # A rescan waiting for the loop: the new cursor and whom to answer once it is stored.
        self._rescan: tuple[int, list[Envelope[RescanFrom]]] | None = None
        self._tick_scope: trio.CancelScope | None = None
        # txid -> (payment id, confirmations) of what was announced and is still in the window
        self._seen: OrderedDict[str, tuple[PaymentId, int]] = OrderedDict()
        self._rng = random.Random()

    # --- running ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                # Commands are served at once: status and pause work while the wallet is away.
                nursery.start_soon(self._serve_commands)
                task_status.started()
                await self._loop()
        finally:
            with trio.CancelScope(shield=True):
                await self.wallet.aclose()

    async def _loop(self) -> None:
        while True:
            while self._rescan is not None:
                await self._apply_rescan()
            if not self.paused:
                self._wallet_answered = False
                with trio.CancelScope() as self._tick_scope:  # a rescan cancels it
                    try:
                        await self.tick()
                    except ConfigError:
                        raise  # the wrong wallet: restarting cannot fix it (exit 2)
                    except RpcError as exc:
                        self.wallet_error = str(exc)
                        self._failed(exc)
                    except _StorageFailed as exc:  # a full disk, storage restarting
                        if self._wallet_answered:
                            self.wallet_error = None  # the wallet is fine: it answered
                        self.storage_error = str(exc.error)
                        self._failed(exc.error, "storage")
                    except AnonTicketError as exc:
                        self._failed(exc, "poll")
                self._tick_scope = None
                if self._rescan is not None:
                    continue
            delay = self.config.poll_interval
            if self.failures:
                base = min(self.config.backoff_max,
                           self.config.backoff_initial * 2 ** (self.failures - 1))
                delay = base * self._rng.uniform(0.5, 1.5)
            self._update_gauges()
            with trio.move_on_after(delay):
                await self._wake.wait()
            self._wake = trio.Event()

    def _failed(self, exc: AnonTicketError, source: str = "wallet") -> None:
        self.failures += 1
        self.last_error = f"recording failed: {exc}" if source == "storage" else str(exc)
        if source != "storage":
            kind = ("timeout" if isinstance(exc, RpcTimeout) else
                    "unavailable" if isinstance(exc, RpcUnavailable) else
                    "busy" if isinstance(exc, RpcBusy) else "error")
            self.metrics.rpc_calls.labels(kind).inc()
        (log.warning if self.failures < 3 else log.error)(
            "poll failed", source=source, error=str(exc), failures=self.failures)

    async def _store(self, msg: Asks[StorageMsg, R]) -> R:
        """Ask storage; its failure is reported as storage's (NotFound is an answer)."""
        try:
            return await self.storage.ask(msg, self.config.request_timeout)
        except NotFound:
            raise
        except AnonTicketError as exc:
            raise _StorageFailed(exc) from exc


    async def _serve_commands(self) -> None:
        """One command at a time, in order (a rescan's check may ask storage meanwhile)."""
        dispatch = Dispatch(self.name, {
            PollerStatus: self._status,
            PausePoller: self._pause,
            ResumePoller: self._resume,
            RescanFrom: self._rescan_from,
        })
        async for env in self.mailbox.inbox:
            pending = dispatch(env)
            if pending is not None:
                await pending

    async def _status(self, env: Envelope[PollerStatus]) -> None:
        env.reply(self.status())

    async def _pause(self, env: Envelope[PausePoller]) -> None:
        if await self._store_pause(env, True):
            self.paused = True
            log.info("audit: poller paused")
            env.reply(self.status())

    async def _resume(self, env: Envelope[ResumePoller]) -> None:
        if await self._store_pause(env, False):
            self.paused = False
            log.info("audit: poller resumed")
            self._wake.set()
            env.reply(self.status())

    async def _store_pause(self, env: Envelope[PausePoller] | Envelope[ResumePoller],
                           paused: bool) -> bool:
        """Stored first, so that what the operator was told outlives a restart and a change
        of leader; if storage cannot, the command fails and nothing changes."""
        try:
            await self._store(PollerPauseFlag(paused))
        except _StorageFailed as exc:
            env.fail(exc.error)
            return False
        self._pause_known = True
        return True

    async def _load_pause(self) -> bool:
        """At the first tick: a pause stored by an earlier run (or the last leader) holds."""
        stored = await self._store(PollerPauseFlag())
        if self._pause_known:
            return False  # a pause or resume came meanwhile: it decided
        self._pause_known = True
        if stored:
            self.paused = True
            log.info("poller starting paused: an operator paused it (ctl poller resume)")
        return stored

    async def _rescan_from(self, env: Envelope[RescanFrom]) -> None:
        """Checked here, applied by the polling loop between ticks (`_apply_rescan`)."""
        height = env.msg.height
        try:
            await self._check_rescan(height)
        except _StorageFailed as exc:
            env.fail(exc.error)
            return
        except AnonTicketError as exc:
            env.fail(exc)
            return
        waiting = self._rescan[1] if self._rescan is not None else []
        self._rescan = (max(0, height - 1), [*waiting, env])
        if self._tick_scope is not None:
            self._tick_scope.cancel()  # its window's cursor must not overwrite ours
        self._wake.set()

    async def _check_rescan(self, height: object) -> None:
        """A height above the wallet's would skip the blocks below it once they come; going
        back (to the cursor or below) is always safe: nothing is credited twice (I1), so it
        needs no wallet (the cursor is read from storage if no tick has yet)."""
        if type(height) is not int or not 0 <= height <= MAX_HEIGHT:
            raise InvalidInput("invalid request: `from_height` must be a non-negative integer "
                               "(a block height)")
        cursor = self.cursor if self.cursor is not None else await self._load_cursor()
        if height <= cursor + 1:
            return
        if self.wallet_height is None:
            raise Unavailable("cannot check `from_height` yet: the wallet's height is not "
                              "known (the wallet has not answered); retry once it has",
                              retry_after=5)
        if height > self.wallet_height:
            raise InvalidInput(f"invalid request: `from_height` {height} is above the "
                               f"wallet's height {self.wallet_height}")

    async def _apply_rescan(self) -> None:
        """Between ticks: commit the new cursor, then answer every rescan it settles."""
        assert self._rescan is not None
        cursor, waiting = self._rescan
        self._rescan = None
        try:
            await self._store(RecordTransfers((), cursor=cursor))
        except _StorageFailed as exc:
            for env in waiting:
                env.fail(exc.error)
            return
        self.cursor = cursor
        log.info("audit: rescan", from_height=cursor + 1)
        status = self.status()
        for env in waiting:
            env.reply(status)

    def status(self) -> Figures:
        lag = None
        if self.wallet_height is not None and self.cursor is not None:
            lag = max(0, self._safe_height(self.wallet_height) - self.cursor)
        age = None if self.last_success is None else time.monotonic() - self.last_success
        lagging = lag is not None and lag > max(self.config.window_blocks,
                                                2 * self.config.min_confirmations)
        stale = age is None or age > max(60.0, 6 * self.config.poll_interval)
        # The wallet answered a whole tick, or as much of one as storage let it.
        reachable = self.wallet_error is None and (
            self.last_success is not None or self.storage_error is not None)
        ok = reachable and self.last_error is None and not (stale or lagging)
        return {
            "state": "paused" if self.paused else ("ok" if ok else "degraded"),
            "wallet_reachable": reachable,
            "storage_error": self.storage_error,
            "wallet_height": self.wallet_height,
            "cursor": self.cursor,
            "lag_blocks": lag,
            "last_success_age_secs": None if age is None else round(age, 3),
            "last_error": self.last_error,
            "primary_address": self.identity.primary_address if self.identity else None,
            "watch_only": self.identity.watch_only if self.identity else None,
        }

    def _update_gauges(self) -> None:
        st = self.status()
        if st["lag_blocks"] is not None:
            self.metrics.poll_lag.set(st["lag_blocks"])
        if st["last_success_age_secs"] is not None:
            self.metrics.last_poll_age.set(st["last_success_age_secs"])

    def _safe_height(self, wallet_height: int) -> int:
        # confirmations = wallet height - transfer height (I6)
        return wallet_height - self.config.min_confirmations

    # --- one tick -------------------------------------------------------------------------

    async def _check_identity(self) -> None:
        identity = await self.wallet.identity()
        identity.check(self.config.expected_primary, self.wallet.url)
        if not identity.watch_only:
            log.warning("the wallet can spend: a watch-only wallet (address + view key) is "
                        "enough and safer")
        log.info("wallet identified", primary_address=identity.primary_address,
                 watch_only=identity.watch_only)
        self.identity = identity
        self._wallet_answered = True

    async def _load_cursor(self) -> int:
        stored = await self._store(ReadCursor())
        if stored is not None:
            return int(stored)
        start = self.config.start_height
        return max(0, start - 1) if start is not None else 0

    async def tick(self) -> None:
        if not self._pause_known and await self._load_pause():
            return
        if self.identity is None:
            await self._check_identity()
        if self.cursor is None:
            self.cursor = await self._load_cursor()
            log.info("poller starting", cursor=self.cursor)
        await self.wallet.refresh()
        height = await self.wallet.get_height()
        self._wallet_answered = True
        self.wallet_height = height
        self.metrics.wallet_height.set(height)
        safe = self._safe_height(height)
        # The recent window is read and announced first, so a transfer's N-th confirmation
        # reaches watchers before the credit's `payment_confirmed` (the README's order).
        low = max(0, height - self.config.reorg_window)
        entries = await self.wallet.pool_and_recent(low)
        present, deep = self._announce_recent(entries, height, safe)
        await self._credit_up_to(safe)
        await self._reconcile_recent(low, present, deep)
        self.metrics.rpc_calls.labels("ok").inc()
        self.failures = 0
        self.last_error = self.storage_error = self.wallet_error = None
        self.last_success = time.monotonic()

    async def _credit_up_to(self, safe: int) -> None:
        assert self.cursor is not None
        started, first = time.monotonic(), self.cursor
        last_report = started
        while self.cursor < safe:
            low = self.cursor
            high = min(low + self.config.window_blocks, safe)
            entries = await self.wallet.incoming(low, high)
            transfers: list[Transfer] = []
            skipped: list[SkippedTransfer] = []
            for entry in entries:
                result = classify(entry, self.config.min_payment_amount)
                if isinstance(result, Transfer):
                    transfers.append(result)
                else:
                    skipped.append(result)
                    self.metrics.payments_ingested.labels(f"skipped_{result.reason}").inc()
            for msg in chunks_at_block_boundaries(transfers, skipped, high):
                recorded = await self._store(msg)
                self.metrics.payments_ingested.labels("credited").inc(recorded.credited)
                self.metrics.payments_ingested.labels("duplicate").inc(
                    len(msg.transfers) - recorded.credited)
                assert msg.cursor is not None
                self.cursor = msg.cursor
                self.metrics.last_height.set(self.cursor)
            now = time.monotonic()
            if now - last_report >= 5.0 and self.cursor < safe:
                rate = (self.cursor - first) / (now - started)
                eta = (safe - self.cursor) / rate if rate > 0 else None
                log.info("catching up", height=self.cursor, target=safe,
                         heights_per_sec=round(rate, 1),
                         eta_secs=None if eta is None else round(eta))
                last_report = now
        self.metrics.last_height.set(self.cursor)

    def _announce_recent(self, entries: Sequence[WalletTransfer], wallet_height: int,
                         safe: int) -> tuple[set[bytes], list[Transfer]]:
        """Announce what the pool and the recent blocks hold; return the txids present and
        the transfers deep enough to be credited."""
        present: set[bytes] = set()
        deep: list[Transfer] = []
        for entry in entries:
            seen = sighting(entry)
            if seen is None:
                continue
            present.add(bytes.fromhex(seen.txid))
            confirmations = 0 if seen.height is None else wallet_height - seen.height
            if seen.height is not None and seen.height <= safe:
                result = classify(entry, self.config.min_payment_amount)
                if isinstance(result, Transfer):
                    deep.append(result)
            self._announce(seen.pid, seen.txid, seen.amount, seen.height, confirmations)
        for txid, (pid, _) in list(self._seen.items()):
            if bytes.fromhex(txid) not in present:  # left the pool unmined, or the window
                del self._seen[txid]
                self._emit(SightingGone(pid, txid))
        return present, deep

    async def _reconcile_recent(self, low: int, present: set[bytes],
                                deep: list[Transfer]) -> None:
        """Re-ingest recent transfers the chain re-mined; mark vanished the recorded ones it
        no longer holds (I7)."""
        recorded = await self._store(RecentTransfers(low))
        known = {(r.txid, r.pid.raw): r.height for r in recorded}
        again = [t for t in deep if known.get((t.txid, t.pid.raw)) != t.height]
        if again:
            # Re-mined (possibly lower) after a reorg, or below a cursor that moved on.
            await self._store(RecordTransfers(tuple(again)))
            log.info("re-ingested recent transfers", count=len(again))
        for r in recorded:
            if r.txid in present:
                continue
            if await self.wallet.transfer_exists(r.txid.hex()):
                continue
            try:  # storage publishes the `reorg` event itself, numbered and committed
                await self._store(MarkVanished(r.txid, r.pid))
            except NotFound:
                continue
            self.metrics.payments_ingested.labels("vanished").inc()

    def _announce(self, pid: PaymentId, txid: str, amount: int, height: int | None,
                  confirmations: int) -> None:
        known = self._seen.get(txid)
        self._seen[txid] = (pid, confirmations)
        self._seen.move_to_end(txid)
        while len(self._seen) > SEEN_MEMORY:
            self._seen.popitem(last=False)
        required = self.config.min_confirmations
        if known is None:
            log.info("payment seen", pid=pid.redacted(), amount=amount,
                     in_pool=height is None)
            self._emit(PaymentSeen(pid, txid, amount, height, confirmations, required))
        if 0 < confirmations <= required and (known is None or known[1] != confirmations):
            self._emit(Confirmations(pid, txid, confirmations, required))

    def _emit(self, event: PaymentSeen | Confirmations | SightingGone) -> None:
        if self.events is None:
            return
        try:
            self.events.tell(event)
        except AnonTicketError:
            pass  # announcements are best effort; committed facts come from storage
