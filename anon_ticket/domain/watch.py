"""The watch protocol (websocket `GET /api/v1/watch`): client requests and server messages.

client → server
    {"op": "subscribe", "pid": "<16 hex>"}  or  {"op": "subscribe", "token": "<64 hex>"}
        optional "since": <seq> and "epoch": <epoch> to resume
    {"op": "unsubscribe", "pid" | "token": ...}
    {"op": "ping"}
server → client (each message names the pid or token it is about, as subscribed)
    {"type": "state", "seq", "epoch", "status", "balance", "pending"}   on subscribe;
        pending: transfers seen but not credited yet,
        [{"amount", "in_pool", "confirmations", "required"}] (always [] for a token)
    {"type": "payment_confirmed" | "topped_up" | "claimed" | "revoked" | "reorg", "seq",
     "epoch", ...}                                               committed facts, seq > state's
    {"type": "payment_seen", "amount", "in_pool"}                 first sighting (no seq)
    {"type": "confirmations", "confirmations", "required"}        k of N (no seq)
    {"type": "gap"}                                               resume impossible; state follows
    on a resume (replayed events instead of a state), the pending transfers follow the replay
    as `payment_seen` and `confirmations`
    {"type": "error", "error"}                                    bad request; connection stays
    {"type": "pong"}

Inside the process, a watcher is the public actor's websocket connection with an outbound
queue (mailboxes/outbox.py); the hub sees it as a `Subscriber` and takes `Subscribe`,
`Unsubscribe`, `Drop` and `Replay` (below). What travels to a connection's writer is a
`WatchItem`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from anon_ticket.domain.errors import InvalidInput
from anon_ticket.domain.ids import PID_BYTES, PaymentId, ServiceToken
from anon_ticket.domain.messages import (
    Confirmations,
    Notice,
    PaymentSeen,
    Request,
    TicketEvent,
    TicketState,
)

MAX_SUBSCRIPTIONS = 16
# Watchers of one payment id (or one token) at once: a commit's fan-out is bounded by it, and
# so is the work one ticket's watchers cost every commit of it.
MAX_WATCHERS_PER_KEY = 100
# Close codes
GOING_AWAY = 1001  # draining or shutting down
TRY_AGAIN_LATER = 1013  # too many connections
SLOW_CONSUMER = 4008


@dataclass(frozen=True, slots=True)
class Key:
    """What a watcher subscribed to: a payment id or a token."""

    kind: str  # "pid" | "token"
    pid: PaymentId | None = None
    token: ServiceToken | None = None

    @property
    def raw(self) -> bytes:
        value = self.pid if self.pid is not None else self.token
        assert value is not None
        return value.raw

    @property
    def text(self) -> str:
        value = self.pid if self.pid is not None else self.token
        assert value is not None
        return value.hex()

    @property
    def noun(self) -> str:
        return "payment id" if self.kind == "pid" else "token"

    @classmethod
    def of_raw(cls, raw: bytes) -> Key:
        """The key a subscription registered as bytes (8: a payment id, 32: a token)."""
        if len(raw) == PID_BYTES:
            return cls("pid", pid=PaymentId(raw))
        return cls("token", token=ServiceToken(raw))


@dataclass(frozen=True, slots=True)
class WatchRequest:
    op: str  # subscribe | unsubscribe | ping
    key: Key | None = None
    since: int | None = None
    epoch: int | None = None


def parse_request(text: str | bytes) -> WatchRequest:
    """One client message, or InvalidInput saying what is wrong with it."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise InvalidInput("invalid request: message is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidInput("invalid request: message must be a JSON object")
    op = data.get("op")
    if op == "ping":
        return WatchRequest("ping")
    if op not in ("subscribe", "unsubscribe"):
        raise InvalidInput("invalid request: `op` must be subscribe, unsubscribe or ping")
    if ("pid" in data) == ("token" in data):
        raise InvalidInput("invalid request: give exactly one of `pid` and `token`")
    key = (Key("pid", pid=PaymentId.parse(data["pid"])) if "pid" in data
           else Key("token", token=ServiceToken.parse(data["token"])))
    since, epoch = data.get("since"), data.get("epoch")
    for name, value in (("since", since), ("epoch", epoch)):
        if value is not None and (type(value) is not int or value < 0):
            raise InvalidInput(f"invalid request: `{name}` must be a non-negative integer")
    return WatchRequest(op, key, since, epoch)


# --- what travels to a connection's writer ------------------------------------------------
# Tuples (NamedTuple): the hub makes one per key and commit, shared by all of that key's
# watchers; tuples of plain values are not tracked by the cyclic GC.


class WatchText(NamedTuple):
    """A message to send as it is (a pong, an error)."""

    text: str


class PendingPayment(NamedTuple):
    """A transfer to a payment id the poller has announced and not yet seen deep enough:
    what a watcher that subscribes late is told it missed."""

    amount: int
    in_pool: bool
    confirmations: int
    required: int


class WatchReady(NamedTuple):
    """A subscription is registered and its state read: the writer sends a gap (if resuming
    was impossible), then the replayed events and the pending transfers' announcements, or
    else the state (which carries them), then what waited for it."""

    key: bytes
    state: TicketState
    replay: tuple[TicketEvent, ...] | None
    gap: bool
    pending: tuple[PendingPayment, ...] = ()


class WatchEvent(NamedTuple):
    """A fact for every watcher of `key`, encoded once by the hub. A committed event carries
    its `seq` (the writer skips what the state or replay covered), an announcement None."""

    key: bytes
    seq: int | None
    text: str


WatchItem = WatchText | WatchReady | WatchEvent


class Subscriber(Protocol):
    """A watcher as the hub sees it: a queue it puts into without ever waiting (False: full),
    and drops, marked slow, when it does not keep up. `keys` are its subscriptions, kept by
    the hub."""

    keys: set[bytes]
    slow: bool

    def put(self, item: WatchItem) -> bool: ...

    def mark_slow(self) -> None: ...


# --- the hub's subscriptions ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Subscribe(Request[tuple[PendingPayment, ...]]):
    """Answered with the key's pending transfers as the hub knows them when it registers the
    watcher (announcements after that reach its queue). Refused (InvalidInput, for the
    watcher to read) when the key has its fill of watchers."""

    watcher: Subscriber
    key: bytes  # 8-byte payment id or 32-byte token


@dataclass(frozen=True, slots=True)
class Unsubscribe(Request[bool]):
    watcher: Subscriber
    key: bytes


@dataclass(frozen=True, slots=True)
class Drop(Notice):
    """The watcher's connection ended: every subscription of it goes."""

    watcher: Subscriber


@dataclass(frozen=True, slots=True)
class Replay(Request[tuple[TicketEvent, ...] | None]):
    """Events of a ticket with since < seq <= upto, or None when the buffer no longer has
    them all (the watcher then gets `gap` + `state`)."""

    pid: bytes
    since: int
    upto: int


# --- server messages -----------------------------------------------------------------------


def _about(key: Key) -> dict[str, Any]:
    return {key.kind: key.text}


def state_message(key: Key, state: TicketState,
                  pending: tuple[PendingPayment, ...] = ()) -> dict[str, Any]:
    return {"type": "state", **_about(key), "seq": state.seq, "epoch": state.epoch,
            "status": state.status, "balance": state.balance,
            "pending": [p._asdict() for p in pending]}


def pending_messages(key: Key, pending: PendingPayment) -> list[dict[str, Any]]:
    """A pending transfer told as the announcements a watcher would have seen live."""
    seen = {"type": "payment_seen", **_about(key), "amount": pending.amount,
            "in_pool": pending.in_pool}
    if pending.confirmations <= 0:
        return [seen]
    return [seen, {"type": "confirmations", **_about(key),
                   "confirmations": pending.confirmations, "required": pending.required}]


def event_message(key: Key, event: TicketEvent) -> dict[str, Any]:
    return {"type": event.kind.value, **_about(key), "seq": event.seq, "epoch": event.epoch,
            **dict(event.fields)}


def note_message(key: Key, note: PaymentSeen | Confirmations) -> dict[str, Any]:
    if isinstance(note, PaymentSeen):
        return {"type": "payment_seen", **_about(key), "amount": note.amount,
                "in_pool": note.height is None}
    return {"type": "confirmations", **_about(key), "confirmations": note.confirmations,
            "required": note.required}


def gap_message(key: Key) -> dict[str, Any]:
    return {"type": "gap", **_about(key)}


def error_message(text: str) -> dict[str, Any]:
    return {"type": "error", "error": text}


def encode(message: dict[str, Any]) -> str:
    """A server message as sent: compact JSON (the hub encodes an event once per key, not
    once per watcher)."""
    return json.dumps(message, separators=(",", ":"))
