"""Token derivation (docs/architecture.md §6): derived once at claim, then stored and returned
as stored."""

from __future__ import annotations

import hashlib
import hmac
from enum import Enum

from anon_ticket.domain.ids import PaymentId, ServiceToken


class Derivation(Enum):
    HMAC = "hmac"
    LEGACY = "legacy"


def _message(pid: PaymentId, txid: str) -> bytes:
    return f"{pid.hex()}|{txid}".encode()


def derive_hmac(secret: bytes, pid: PaymentId, txid: str) -> ServiceToken:
    """HMAC-SHA3-256 under the server secret: a leaked database does not leak every token."""
    return ServiceToken(hmac.digest(secret, _message(pid, txid), "sha3_256"))  # one-shot, in C


def derive_legacy(pid: PaymentId, txid: str) -> ServiceToken:
    """The original's derivation, SHA3-256(lowercase_hex(pid) + "|" + txid)."""
    return ServiceToken(hashlib.sha3_256(_message(pid, txid)).digest())


def derive(derivation: Derivation, secret: bytes, pid: PaymentId, txid: str) -> ServiceToken:
    if derivation is Derivation.LEGACY:
        return derive_legacy(pid, txid)
    return derive_hmac(secret, pid, txid)
