"""Which wallet transfers credit a ticket, and why the others do not (I6, I7; pure).

Payment ids are chosen by whoever pays, so only a well-formed, non-zero 8-byte id counts; a
transfer with no id, the all-zero id, a legacy 32-byte id, a dust or absurd amount, a type other
than `in`, or a time lock is skipped with its reason and recorded for the operator. Nothing
here can raise on a malformed entry: a poison transfer must never stall the poller.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from enum import Enum
from typing import Any

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
class Sighting:
    """A transfer seen before it is claimable (pool or shallow): announced, never credited."""

    txid: str
    pid: PaymentId
    amount: int
    height: int | None  # None while in the pool


def _txid(entry: dict[str, Any]) -> bytes | None:
    txid = entry.get("txid")
    if isinstance(txid, str) and len(txid) == 64 and _HEX.issuperset(txid.lower()):
        return bytes.fromhex(txid)
    return None


def _int(entry: dict[str, Any], key: str) -> int | None:
    value = entry.get(key)
    return value if type(value) is int else None


def _pid(entry: dict[str, Any]) -> PaymentId | SkipReason:
    raw = entry.get("payment_id")
    if not isinstance(raw, str):
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


def classify(entry: dict[str, Any], min_amount: int) -> Transfer | SkippedTransfer:
    """A confirmed `get_transfers` entry → a creditable transfer, or a skip with its reason."""
    txid = _txid(entry)
    amount = _int(entry, "amount")
    height = _int(entry, "height")
    shown_pid = entry.get("payment_id") if isinstance(entry.get("payment_id"), str) else None
    if txid is None or amount is None or height is None or amount < 0 or height < 0:
        digest = hashlib.sha3_256(json.dumps(entry, sort_keys=True, default=str).encode())
        return SkippedTransfer(digest.digest(), SkipReason.MALFORMED.value,
                               max(0, min(amount or 0, MAX_AMOUNT)), max(0, height or 0),
                               shown_pid)

    def skip(reason: SkipReason) -> SkippedTransfer:
        return SkippedTransfer(txid, reason.value, min(amount, MAX_AMOUNT), height, shown_pid)

    if entry.get("type") != "in":
        return skip(SkipReason.NOT_INCOMING)
    unlock = entry.get("unlock_time", 0)
    if unlock != 0:
        return skip(SkipReason.TIME_LOCKED)
    pid = _pid(entry)
    if isinstance(pid, SkipReason):
        return skip(pid)
    if amount > MAX_AMOUNT:
        return skip(SkipReason.ABSURD_AMOUNT)
    if amount < min_amount:
        return skip(SkipReason.DUST)
    return Transfer(txid, pid, amount, height)


def sighting(entry: dict[str, Any]) -> Sighting | None:
    """A pool or shallow entry worth announcing (a payment id we could credit later)."""
    txid = _txid(entry)
    amount = _int(entry, "amount")
    pid = _pid(entry)
    if txid is None or amount is None or isinstance(pid, SkipReason):
        return None
    height = _int(entry, "height")
    in_pool = entry.get("type") == "pool" or not height
    return Sighting(txid.hex(), pid, amount, None if in_pool else height)
