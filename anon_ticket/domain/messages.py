"""What actors ask and tell each other: domain facts and the requests about them (pure,
frozen). Operator commands and status reads are anon_ticket/domain/commands.py's, the hub's
subscriptions anon_ticket/domain/watch.py's; what each actor's mailbox takes is listed in
anon_ticket/domain/inboxes.py.

Every message is a `Request[R]` (asked: its answer is an R, which `Mailbox.ask` returns, so
mypy checks each asker) or a `Notice` (told: nobody waits). Both are frozen dataclasses with
slots, and the bases add no state: a message costs what it did without them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, Generic, Protocol, Self, TypeVar

from anon_ticket.domain.ids import PaymentId, ServiceToken

R = TypeVar("R")


class Request(Generic[R]):
    """A message that is asked and answered with an R (or a failure)."""

    __slots__ = ()
    if TYPE_CHECKING:
        # How mailboxes/mailbox.py's `Asks` reads a request (structurally: the domain imports
        # nothing outside itself). Declared for the type checker only, never defined.
        def _message(self) -> Self: ...

        def _reply(self) -> R: ...


class Notice:
    """A message that is told: nobody waits for an answer."""

    __slots__ = ()
    if TYPE_CHECKING:
        # mailboxes/mailbox.py's `Tells`, as above.
        def _message(self) -> Self: ...

        def _unanswered(self) -> None: ...


# --- storage -------------------------------------------------------------------------------


class ClaimStatus(Enum):
    SUCCESS = "success"
    ALREADY_CLAIMED = "already_claimed"


@dataclass(frozen=True, slots=True)
class Claimed:
    status: ClaimStatus
    token: ServiceToken
    balance: int


@dataclass(frozen=True, slots=True)
class Claim(Request[Claimed]):
    """Redeem a payment id for its service token (exactly once; retries see the same token)."""

    pid: PaymentId


@dataclass(frozen=True, slots=True)
class TokenInfo:
    revoked: bool
    amount: int
    issued_at: str
    revoked_at: str | None
    abuse_score: int
    revoke_reason: str | None = None


@dataclass(frozen=True, slots=True)
class LookupToken(Request[TokenInfo]):
    token: ServiceToken


@dataclass(frozen=True, slots=True)
class Revoke(Request[TokenInfo]):
    token: ServiceToken
    reason: str | None = None
    abuse_score: int | None = None


@dataclass(frozen=True, slots=True)
class Transfer:
    """A confirmed incoming transfer that qualifies for crediting."""

    txid: bytes
    pid: PaymentId
    amount: int
    height: int


@dataclass(frozen=True, slots=True)
class SkippedTransfer:
    """A transfer that does not qualify, kept for the operator (I7)."""

    txid: bytes
    reason: str
    amount: int
    height: int
    payment_id: str | None = None


@dataclass(frozen=True, slots=True)
class Recorded:
    credited: int
    new_pids: tuple[PaymentId, ...]
    topped_up: tuple[PaymentId, ...]
    cursor: int | None


@dataclass(frozen=True, slots=True)
class RecordTransfers(Request[Recorded]):
    """Credit transfers and advance the cursor in one transaction (I1, I4)."""

    transfers: tuple[Transfer, ...]
    skipped: tuple[SkippedTransfer, ...] = ()
    cursor: int | None = None


@dataclass(frozen=True, slots=True)
class ReadCursor(Request[int | None]):
    pass


@dataclass(frozen=True, slots=True)
class PollerPauseFlag(Request[bool]):
    """The poller's pause as stored, so that it outlives a restart and, with several nodes,
    a change of leader: `None` reads it, `True` or `False` stores it. Answers the flag."""

    paused: bool | None = None


@dataclass(frozen=True, slots=True)
class RecordedTransfer:
    txid: bytes
    pid: PaymentId
    height: int


@dataclass(frozen=True, slots=True)
class RecentTransfers(Request[tuple[RecordedTransfer, ...]]):
    """Surviving recorded transfers above a height (for the reorg check)."""

    above_height: int


@dataclass(frozen=True, slots=True)
class Vanished:
    pid: PaymentId
    amount: int
    claimed: bool


@dataclass(frozen=True, slots=True)
class MarkVanished(Request[Vanished]):
    """A recorded transfer the synced wallet no longer knows (I6)."""

    txid: bytes
    pid: PaymentId


@dataclass(frozen=True, slots=True)
class SkippedRow:
    txid: str
    reason: str
    amount: int
    height: int
    recorded_at: str


@dataclass(frozen=True, slots=True)
class ListSkipped(Request[tuple[SkippedRow, ...]]):
    limit: int = 100


class EventKind(Enum):
    PAYMENT_CONFIRMED = "payment_confirmed"
    TOPPED_UP = "topped_up"
    CLAIMED = "claimed"
    REVOKED = "revoked"
    REORG = "reorg"


@dataclass(frozen=True, slots=True)
class TicketEvent:
    """A committed fact about one ticket, numbered per ticket in commit order."""

    kind: EventKind
    pid: PaymentId
    token: ServiceToken | None
    seq: int
    epoch: int
    fields: tuple[tuple[str, object], ...] = ()


@dataclass(frozen=True, slots=True)
class TicketState:
    pid: PaymentId
    token: ServiceToken | None
    seq: int
    epoch: int
    status: str  # waiting | claimable | claimed | revoked
    balance: int


@dataclass(frozen=True, slots=True)
class ReadTicketState(Request[TicketState]):
    """The current state of a ticket by payment id or token (for a new watcher)."""

    pid: PaymentId | None = None
    token: ServiceToken | None = None


# --- filter --------------------------------------------------------------------------------


class Presence(Enum):
    ABSENT = "absent"  # Bloom negative: certainly never recorded
    MAYBE = "maybe"  # ask storage


@dataclass(frozen=True, slots=True)
class Lookup(Request[Claimed | Presence]):
    """Ask the filter whether a payment id can possibly be claimable."""

    pid: PaymentId


@dataclass(frozen=True, slots=True)
class Redeem(Request[Claimed | Presence]):
    """A redeem through the filter: it answers a Bloom negative (Presence.ABSENT) and a cached
    claim itself, and forwards anything else to storage as a `Claim`, which answers. The
    requester waits once, however many actors the request passes."""

    pid: PaymentId


# The `ack` of new ids no poller waits for (another node's, a node's own before its COMMIT).
NOTHING_RECORDED = Recorded(0, (), (), None)


@dataclass(frozen=True, slots=True)
class AddPids(Request[Recorded]):
    """Storage to the filter, after the COMMIT of transfers that recorded new payment ids.

    Three jobs, done by the filter in this order (I8):
    - `pids`: add them to the Bloom filter, before anything announces them claimable;
    - `ack`: then answer the poller's `RecordTransfers`, which this request carries on
      (storage forwards the poller's reply slot with it): the poller moves on only once its
      new ids are in the filter;
    - `events`: then hand the transaction's committed events to the hub, so no watcher
      hears of a payment the filter would still answer 404 for.
    """

    pids: tuple[PaymentId, ...]
    ack: Recorded
    events: tuple[TicketEvent, ...] = ()


@dataclass(frozen=True, slots=True)
class Publish(Notice):
    """Committed events on their way to the hub (through the filter, in commit order)."""

    events: tuple[TicketEvent, ...]


@dataclass(frozen=True, slots=True)
class CacheClaim:
    """A committed claim: the positive cache may now answer `already_claimed` for it."""

    pid: PaymentId
    token: ServiceToken
    balance: int


@dataclass(frozen=True, slots=True)
class Invalidate:
    """A committed top-up or revoke: drop the cached answer."""

    pids: tuple[PaymentId, ...]


@dataclass(frozen=True, slots=True)
class Settle(Request[object]):
    """Storage to the filter, after a transaction that invalidated cached answers (a revoke,
    a top-up, a vanished transfer): answer the requester with `answer` only once the
    invalidation is applied everywhere (with worker processes, once every worker has it
    queued: docs/architecture.md §8). Storage forwards the requester's reply slot with it."""

    answer: object


@dataclass(frozen=True, slots=True)
class Announce:
    """A poller's announcement (a payment seen, its confirmations) passed through storage in
    its order (several nodes on PostgreSQL: so the cluster feed carries it to every node's
    hub ahead of the transfer's crediting, docs/architecture.md §9)."""

    notes: tuple[Note, ...]


# One change of a storage transaction that the filter must hear of: a cache fill, an
# invalidation, events for the hub, or (PostgreSQL) announcements for the hub.
Effect = CacheClaim | Invalidate | Publish | Announce


@dataclass(frozen=True, slots=True)
class Committed(Notice):
    """What one storage transaction changed, in order: cache fills, invalidations and
    events, in one message to the filter (not up to three a claim)."""

    effects: tuple[Effect, ...]


# --- poller ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PaymentSeen(Notice):
    """First sighting of a transfer to a payment id (pool or block). Shallower than
    `required` it is not claimable yet; the hub keeps it as pending until it is."""

    pid: PaymentId
    txid: str
    amount: int
    height: int | None  # None: in the pool
    confirmations: int
    required: int


@dataclass(frozen=True, slots=True)
class Confirmations(Notice):
    """k of N, announced before the transfer is credited at N (so a watcher sees the N-th
    confirmation before `payment_confirmed`)."""

    pid: PaymentId
    txid: str
    confirmations: int
    required: int


@dataclass(frozen=True, slots=True)
class SightingGone(Notice):
    """A transfer announced earlier is no longer in the wallet's pool or recent blocks: left
    the pool unmined, or went deeper than the window (credited by then)."""

    pid: PaymentId
    txid: str


# --- worker processes (docs/architecture.md §8) ----------------------------------------------


class WorkerQueue(Protocol):
    """A worker's outbound queue as the fanout sees it: put without waiting (False: full),
    and `mark_slow` to give the worker up (its link ends, the process is restarted)."""

    def put(self, item: list[Any]) -> bool: ...

    def mark_slow(self) -> None: ...


# What the poller announces about a payment not yet deep enough (not a committed fact).
Note = PaymentSeen | Confirmations | SightingGone


@dataclass(frozen=True, slots=True)
class Replicated(Notice):
    """The owner's new payment ids and their transaction's events, for a worker's filter:
    into its Bloom filter first, then the events to its hub (I8, across processes)."""

    pids: tuple[PaymentId, ...]
    events: tuple[TicketEvent, ...] = ()


@dataclass(frozen=True, slots=True)
class Attach(Request[bool]):
    """A worker's link is up: every push from now on goes to `queue` too."""

    index: int
    queue: WorkerQueue


@dataclass(frozen=True, slots=True)
class Detach(Notice):
    index: int
    queue: WorkerQueue


@dataclass(frozen=True, slots=True)
class Acked(Notice):
    """Worker `index` has the `push_id`-th replication in its filter's queue."""

    index: int
    push_id: int


# --- several nodes on one PostgreSQL database (docs/architecture.md §9) ------------------------


@dataclass(frozen=True, slots=True)
class AfterFeed(Request[object]):
    """Storage to its node's cluster actor: `msg` (new ids, or a settle, carrying the
    requester's reply slot) waits until every live node has applied entry `entry` of the
    cluster feed, then goes to the filter: nobody hears of new ids, or of a revocation,
    before every node's filter has them."""

    entry: int
    msg: AddPids | Settle


@dataclass(frozen=True, slots=True)
class FeedSynced(Notice):
    """The cluster actor to its filter: the feed was read to its end; the Bloom filter and the
    cache may answer alone for `valid_for` seconds more (then every redeem asks storage, until
    the next)."""

    valid_for: float


# The largest height (or cursor) storage can hold: SQLite integers are 64-bit.
MAX_HEIGHT = 2**63 - 1
