"""What actors ask and tell each other (pure, frozen)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from anon_ticket.domain.ids import PaymentId, ServiceToken

# --- storage -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Claim:
    """Redeem a payment id for its service token (exactly once; retries see the same token)."""

    pid: PaymentId


class ClaimStatus(Enum):
    SUCCESS = "success"
    ALREADY_CLAIMED = "already_claimed"


@dataclass(frozen=True, slots=True)
class Claimed:
    status: ClaimStatus
    token: ServiceToken
    balance: int


@dataclass(frozen=True, slots=True)
class LookupToken:
    token: ServiceToken


@dataclass(frozen=True, slots=True)
class TokenInfo:
    revoked: bool
    amount: int
    issued_at: str
    revoked_at: str | None
    abuse_score: int
    revoke_reason: str | None = None


@dataclass(frozen=True, slots=True)
class Revoke:
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
class RecordTransfers:
    """Credit transfers and advance the cursor in one transaction (I1, I4)."""

    transfers: tuple[Transfer, ...]
    skipped: tuple[SkippedTransfer, ...] = ()
    cursor: int | None = None


@dataclass(frozen=True, slots=True)
class Recorded:
    credited: int
    new_pids: tuple[PaymentId, ...]
    topped_up: tuple[PaymentId, ...]
    cursor: int | None


@dataclass(frozen=True, slots=True)
class ReadCursor:
    pass


@dataclass(frozen=True, slots=True)
class RecentTransfers:
    """Surviving recorded transfers above a height (for the reorg check)."""

    above_height: int


@dataclass(frozen=True, slots=True)
class RecordedTransfer:
    txid: bytes
    pid: PaymentId
    height: int


@dataclass(frozen=True, slots=True)
class MarkVanished:
    """A recorded transfer the synced wallet no longer knows (I6)."""

    txid: bytes
    pid: PaymentId


@dataclass(frozen=True, slots=True)
class Vanished:
    pid: PaymentId
    amount: int
    claimed: bool


@dataclass(frozen=True, slots=True)
class ListSkipped:
    limit: int = 100


@dataclass(frozen=True, slots=True)
class SkippedRow:
    txid: str
    reason: str
    amount: int
    height: int
    recorded_at: str


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
class ReadTicketState:
    """The current state of a ticket by payment id or token (for a new watcher)."""

    pid: PaymentId | None = None
    token: ServiceToken | None = None


@dataclass(frozen=True, slots=True)
class TicketState:
    pid: PaymentId
    token: ServiceToken | None
    seq: int
    epoch: int
    status: str  # waiting | claimable | claimed | revoked
    balance: int


@dataclass(frozen=True, slots=True)
class Backup:
    path: str


@dataclass(frozen=True, slots=True)
class BackupDone:
    path: str
    bytes: int
    seconds: float


@dataclass(frozen=True, slots=True)
class StorageStats:
    pass


@dataclass(frozen=True, slots=True)
class StorageHealth:
    """Can storage write? Answered at once, outside any transaction: `{"writable": bool,
    "error": str | None}`. While the last write transaction failed, asking probes with a
    tiny write (at most once a second), so health recovers without waiting for a claim."""


# --- filter --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Lookup:
    """Ask the filter whether a payment id can possibly be claimable."""

    pid: PaymentId


@dataclass(frozen=True, slots=True)
class Redeem:
    """A redeem through the filter: it answers a Bloom negative (Presence.ABSENT) and a cached
    claim itself, and forwards anything else to storage as a `Claim`, which answers. The
    requester waits once, however many actors the request passes."""

    pid: PaymentId


class Presence(Enum):
    ABSENT = "absent"  # Bloom negative: certainly never recorded
    MAYBE = "maybe"  # ask storage


@dataclass(frozen=True, slots=True)
class AddPids:
    """Recorded payment ids; the filter acknowledges by replying `ack` to the request."""

    pids: tuple[PaymentId, ...]
    ack: object = None
    events: tuple[TicketEvent, ...] = ()


@dataclass(frozen=True, slots=True)
class Publish:
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
class Committed:
    """What one storage transaction changed, in order: cache fills, invalidations and
    events, in one message to the filter (not up to three a claim)."""

    effects: tuple[CacheClaim | Invalidate | Publish, ...]


@dataclass(frozen=True, slots=True)
class FilterStats:
    pass


# --- poller ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PaymentSeen:
    """First sighting of a transfer to a payment id (pool or block); not claimable yet."""

    pid: PaymentId
    txid: str
    amount: int
    height: int | None


@dataclass(frozen=True, slots=True)
class Confirmations:
    pid: PaymentId
    txid: str
    confirmations: int
    required: int


@dataclass(frozen=True, slots=True)
class PausePoller:
    pass


@dataclass(frozen=True, slots=True)
class ResumePoller:
    pass


# The largest height (or cursor) storage can hold: SQLite integers are 64-bit.
MAX_HEIGHT = 2**63 - 1


@dataclass(frozen=True, slots=True)
class RescanFrom:
    """Scan again from this height on (I1 makes it harmless)."""

    height: int


@dataclass(frozen=True, slots=True)
class PollerStatus:
    pass


@dataclass(frozen=True, slots=True)
class Drain:
    """Stop taking claims (503 with Retry-After) and close watchers; in-flight work finishes."""

    reason: str = "draining"


# --- supervision ---------------------------------------------------------------------------


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
class TreeStatus:
    pass


@dataclass(frozen=True, slots=True)
class RestartActor:
    name: str


@dataclass(frozen=True, slots=True)
class Shutdown:
    reason: str
