"""Which wallet transfers credit a ticket, and why the others do not (I6, I7; pure).

Payment ids are chosen by whoever pays, so only a well-formed, non-zero 8-byte id counts; a
transfer with no id, the all-zero id, a legacy 32-byte id, a dust or absurd amount, a type other
than `in`, or a time lock is skipped with its reason and recorded for the operator. Nothing
here can raise on a malformed entry: a poison transfer must never stall the poller.

The wallet's JSON is read at the edge (anon_ticket/walletrpc.py) into `WalletTransfer`
records; what they mean is decided here.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from anon_ticket.domain.ids import ZERO_PID, PaymentId
from anon_ticket.domain.messages import SkippedTransfer, Transfer

# A single transfer above this (about 4.6 million XMR) is not a ticket payment.
MAX_AMOUNT = 2**62
_HEX = frozenset("0123456789abcdef")


class SkipReason(Enum):
    NO_PAYMENT_ID = "no_payment_id"
    LEGACY_PAYMENT_ID = "legacy_payment_id"
    BAD_PAYMENT_ID = "bad_payment_id"
    DUST = "dust"
    ABSURD_AMOUNT = "absurd_amount"
    NOT_INCOMING = "not_incoming"
    TIME_LOCKED = "time_locked"
    MALFORMED = "malformed"


@dataclass(frozen=True, slots=True)
class WalletTransfer:
    """One `get_transfers` entry as the wallet sent it, each field typed, or None where it
    is missing or of another type. Nothing is judged yet."""

    txid: bytes | None  # None unless 64 hex characters
    payment_id: str | None  # as sent: any text
    amount: int | None  # None unless a non-negative integer
    height: int | None  # None unless a non-negative integer
    type: str | None  # "in", "pool", ...
    time_locked: bool  # `unlock_time` present and not 0
    # Names an entry without a usable txid, amount or height in the skipped list (I7): a
    # digest of the entry as sent. Only such entries carry one (a digest each would slow a
    # catch-up).
    fingerprint: bytes | None = None


@dataclass(frozen=True, slots=True)
class Sighting:
    """A transfer seen before it is claimable (pool or shallow): announced, never credited."""

    txid: str
    pid: PaymentId
    amount: int
    height: int | None  # None while in the pool


def _pid(raw: str | None) -> PaymentId | SkipReason:
    if raw is None:
        return SkipReason.NO_PAYMENT_ID
    text = raw.lower()
    if not _HEX.issuperset(text):
        return SkipReason.BAD_PAYMENT_ID
    if len(text) == 64:
        return SkipReason.LEGACY_PAYMENT_ID
    if len(text) != 16:
        return SkipReason.BAD_PAYMENT_ID
    value = bytes.fromhex(text)
    if value == ZERO_PID:
        return SkipReason.NO_PAYMENT_ID
    return PaymentId(value)


def classify(entry: WalletTransfer, min_amount: int) -> Transfer | SkippedTransfer:
    """A confirmed `get_transfers` entry → a creditable transfer, or a skip with its reason."""
    txid, amount, height = entry.txid, entry.amount, entry.height
    shown_pid = entry.payment_id
    if txid is None or amount is None or height is None:
        return SkippedTransfer(entry.fingerprint or bytes(32), SkipReason.MALFORMED.value,
                               min(amount or 0, MAX_AMOUNT), height or 0, shown_pid)

    def skip(reason: SkipReason) -> SkippedTransfer:
        return SkippedTransfer(txid, reason.value, min(amount, MAX_AMOUNT), height, shown_pid)

    if entry.type != "in":
        return skip(SkipReason.NOT_INCOMING)
    if entry.time_locked:
        return skip(SkipReason.TIME_LOCKED)
    pid = _pid(entry.payment_id)
    if isinstance(pid, SkipReason):
        return skip(pid)
    if amount > MAX_AMOUNT:
        return skip(SkipReason.ABSURD_AMOUNT)
    if amount < min_amount:
        return skip(SkipReason.DUST)
    return Transfer(txid, pid, amount, height)


def sighting(entry: WalletTransfer) -> Sighting | None:
    """A pool or shallow entry worth announcing (a payment id we could credit later)."""
    txid, amount = entry.txid, entry.amount
    pid = _pid(entry.payment_id)
    if txid is None or amount is None or isinstance(pid, SkipReason):
        return None
    height = entry.height
    in_pool = entry.type == "pool" or not height
    return Sighting(txid.hex(), pid, amount, None if in_pool else height)
