"""The link between the owner process and its worker processes: what crosses, and how.

docs/architecture.md §8. A frame is a 4-byte big-endian length and a msgpack array of
messages (a writer batches what is queued into one frame). Every message is itself an array
that starts with its kind. Only the messages listed here cross, each encoded explicitly:
nothing is deserialized into arbitrary objects (a worker parses hostile clients' bytes; the
owner trusts nothing it sends beyond these shapes, and checks each).

worker -> owner
    ["hello", index, os_pid]
    ["ask", id, what, arg]            what: claim | token | state_pid | state_token
                                      | poller_status | storage_health
    ["ack", push_id]                  a `replicate` (or all before a `barrier`) is in the
                                      worker's filter queue
    ["beat"]
owner -> worker
    ["reply", id, shape, value]       shape: claimed | token_info | state | figures
    ["fail", id, kind, text, retry_after]
    ["push", push_id, what, value]    what: replicate, barrier (both acknowledged)
                                      | committed | seen | confirmations | gone
                                      | synced (the cluster feed was read: §9)
    ["beat"]
"""

from __future__ import annotations

import struct
from typing import Any

import msgspec

from anon_ticket.domain.commands import Figures, PollerStatus, StorageHealth
from anon_ticket.domain.ids import PaymentId, ServiceToken
from anon_ticket.domain.messages import (
    Announce,
    CacheClaim,
    Claim,
    Claimed,
    ClaimStatus,
    Committed,
    Confirmations,
    Effect,
    EventKind,
    FeedSynced,
    Invalidate,
    LookupToken,
    PaymentSeen,
    Publish,
    ReadTicketState,
    SightingGone,
    TicketEvent,
    TicketState,
    TokenInfo,
)
from anon_ticket.errors import AnonTicketError, InvalidInput, NotFound, Unavailable

HEADER = struct.Struct("!I")
MAX_FRAME = 64 * 1024 * 1024

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(list[list[Any]])


class WireError(AnonTicketError):
    """The peer sent something that is not a message of the link: the link ends."""


def frame(messages: list[list[Any]]) -> bytes:
    body = _encoder.encode(messages)
    return HEADER.pack(len(body)) + body


class FrameReader:
    """Cuts a byte stream into frames' messages."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[list[Any]]:
        buf = self._buf
        buf += data
        out: list[list[Any]] = []
        while len(buf) >= HEADER.size:
            (size,) = HEADER.unpack_from(buf)
            if size > MAX_FRAME:
                raise WireError(f"frame of {size} bytes")
            end = HEADER.size + size
            if len(buf) < end:
                break
            try:
                out.extend(_decoder.decode(bytes(buf[HEADER.size:end])))
            except msgspec.DecodeError as exc:
                raise WireError(f"undecodable frame: {exc}") from None
            del buf[:end]
        return out


# --- requests a worker asks the owner ----------------------------------------------------

WorkerAsk = Claim | LookupToken | ReadTicketState | PollerStatus | StorageHealth


def encode_ask(msg: object) -> tuple[str, Any]:
    if isinstance(msg, Claim):
        return "claim", msg.pid.raw
    if isinstance(msg, LookupToken):
        return "token", msg.token.raw
    if isinstance(msg, ReadTicketState):
        return ("state_pid", msg.pid.raw) if msg.pid is not None else (
            "state_token", msg.token.raw if msg.token is not None else b"")
    if isinstance(msg, PollerStatus):
        return "poller_status", None
    if isinstance(msg, StorageHealth):
        return "storage_health", None
    raise WireError(f"{type(msg).__name__} does not cross the link")


def _bytes(value: object, what: str) -> bytes:
    if not isinstance(value, bytes):
        raise WireError(f"{what}: bytes expected")
    return value


def decode_ask(what: object, arg: object) -> tuple[str, WorkerAsk]:
    """(the owner's mailbox to ask, the request); WireError for anything else."""
    try:
        if what == "claim":
            return "storage", Claim(PaymentId(_bytes(arg, what)))
        if what == "token":
            return "storage", LookupToken(ServiceToken(_bytes(arg, what)))
        if what == "state_pid":
            return "storage", ReadTicketState(pid=PaymentId(_bytes(arg, what)))
        if what == "state_token":
            return "storage", ReadTicketState(token=ServiceToken(_bytes(arg, what)))
    except InvalidInput as exc:
        raise WireError(f"{what}: {exc}") from None
    if what == "poller_status":
        return "poller", PollerStatus()
    if what == "storage_health":
        return "storage", StorageHealth()
    raise WireError(f"unknown request {what!r}")


# --- answers -------------------------------------------------------------------------------


def encode_reply(value: object) -> tuple[str, Any]:
    if isinstance(value, Claimed):
        return "claimed", [value.status.value, value.token.raw, value.balance]
    if isinstance(value, TokenInfo):
        return "token_info", [value.revoked, value.amount, value.issued_at, value.revoked_at,
                              value.abuse_score, value.revoke_reason]
    if isinstance(value, TicketState):
        return "state", [value.pid.raw, value.token.raw if value.token else None, value.seq,
                         value.epoch, value.status, value.balance]
    if isinstance(value, dict):
        return "figures", value
    raise WireError(f"{type(value).__name__} does not cross the link")


def decode_reply(shape: str, value: Any) -> object:
    if shape == "claimed":
        status, token, balance = value
        return Claimed(ClaimStatus(status), ServiceToken(token), balance)
    if shape == "token_info":
        return TokenInfo(*value)
    if shape == "state":
        pid, token, seq, epoch, status, balance = value
        return TicketState(PaymentId(pid), ServiceToken(token) if token else None, seq, epoch,
                           status, balance)
    if shape == "figures":
        figures: Figures = value
        return figures
    raise WireError(f"unknown reply {shape!r}")


def encode_failure(error: BaseException) -> tuple[str, str, int]:
    if isinstance(error, NotFound):
        return "not_found", str(error), 0
    if isinstance(error, InvalidInput):
        return "invalid", str(error), 0
    if isinstance(error, Unavailable):
        return "unavailable", str(error), error.retry_after
    return "error", type(error).__name__, 0


def decode_failure(kind: str, text: str, retry_after: int) -> AnonTicketError:
    if kind == "not_found":
        return NotFound(text)
    if kind == "invalid":
        return InvalidInput(text)
    if kind == "unavailable":
        return Unavailable(text, retry_after=retry_after)
    return AnonTicketError(f"owner failed: {text}")


# --- what the owner pushes -----------------------------------------------------------------


def encode_events(events: tuple[TicketEvent, ...]) -> list[Any]:
    return [[e.kind.value, e.pid.raw, e.token.raw if e.token else None, e.seq, e.epoch,
             [list(f) for f in e.fields]] for e in events]


def decode_events(value: list[Any]) -> tuple[TicketEvent, ...]:
    return tuple(TicketEvent(EventKind(k), PaymentId(p), ServiceToken(t) if t else None, s, ep,
                             tuple((str(f[0]), f[1]) for f in fields))
                 for k, p, t, s, ep, fields in value)


def encode_push(msg: object) -> tuple[str, Any]:
    if isinstance(msg, Committed):
        effects: list[Any] = []
        for e in msg.effects:
            if isinstance(e, CacheClaim):
                effects.append(["cache", e.pid.raw, e.token.raw, e.balance])
            elif isinstance(e, Invalidate):
                effects.append(["invalidate", [p.raw for p in e.pids]])
            elif isinstance(e, Announce):
                effects.append(["notes", [list(encode_push(n)) for n in e.notes]])
            else:
                effects.append(["publish", encode_events(e.events)])
        return "committed", effects
    if isinstance(msg, PaymentSeen):
        return "seen", [msg.pid.raw, msg.txid, msg.amount, msg.height, msg.confirmations,
                        msg.required]
    if isinstance(msg, Confirmations):
        return "confirmations", [msg.pid.raw, msg.txid, msg.confirmations, msg.required]
    if isinstance(msg, SightingGone):
        return "gone", [msg.pid.raw, msg.txid]
    if isinstance(msg, FeedSynced):
        return "synced", msg.valid_for
    raise WireError(f"{type(msg).__name__} is not pushed")


def decode_committed(value: list[Any]) -> Committed:
    effects: list[Effect] = []
    for e in value:
        if e[0] == "cache":
            effects.append(CacheClaim(PaymentId(e[1]), ServiceToken(e[2]), e[3]))
        elif e[0] == "invalidate":
            effects.append(Invalidate(tuple(PaymentId(p) for p in e[1])))
        elif e[0] == "notes":
            effects.append(Announce(tuple(decode_note(what, value) for what, value in e[1])))
        else:
            effects.append(Publish(decode_events(e[1])))
    return Committed(tuple(effects))


def decode_note(what: str, value: list[Any]) -> PaymentSeen | Confirmations | SightingGone:
    if what == "seen":
        pid, txid, amount, height, confirmations, required = value
        return PaymentSeen(PaymentId(pid), txid, amount, height, confirmations, required)
    if what == "confirmations":
        pid, txid, confirmations, required = value
        return Confirmations(PaymentId(pid), txid, confirmations, required)
    pid, txid = value
    return SightingGone(PaymentId(pid), txid)


# --- the cluster feed (PostgreSQL, several nodes: docs/architecture.md §9) ------------------
#
# One `cluster_events` row per committed write transaction that other nodes must hear of:
# msgpack of [committed effects (as pushed to a worker), new payment ids, their events].


def encode_feed(effects: tuple[Effect, ...], pids: tuple[PaymentId, ...],
                events: tuple[TicketEvent, ...]) -> bytes:
    return _encoder.encode([encode_push(Committed(effects))[1], [p.raw for p in pids],
                            encode_events(events)])


def decode_feed(body: bytes) -> tuple[Committed, tuple[PaymentId, ...], tuple[TicketEvent, ...]]:
    try:
        effects, pids, events = msgspec.msgpack.decode(body, type=list[Any])
        return (decode_committed(effects), tuple(PaymentId(p) for p in pids),
                decode_events(events))
    except (msgspec.DecodeError, ValueError, TypeError, KeyError, IndexError,
            AnonTicketError) as exc:
        raise WireError(f"unreadable cluster feed entry: {type(exc).__name__}") from None
