"""Payment ids and service tokens: parsing, generation and redaction (pure)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from anon_ticket.domain.errors import InvalidPaymentId, InvalidToken

_HEX = frozenset("0123456789abcdefABCDEF")
PID_BYTES = 8
TOKEN_BYTES = 32
ZERO_PID = bytes(PID_BYTES)


def _parse_hex(text: object, nbytes: int, what: str, exc: type[InvalidPaymentId | InvalidToken]
               ) -> bytes:
    if not isinstance(text, str) or len(text) != nbytes * 2:
        raise exc(f"{what} must be exactly {nbytes * 2} hex characters")
    if not _HEX.issuperset(text):
        raise exc(f"{what} contains non-hex characters")
    return bytes.fromhex(text)


@dataclass(frozen=True, slots=True)
class PaymentId:
    """The 8-byte payment id a client draws and encodes into an integrated address."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != PID_BYTES:
            raise InvalidPaymentId("payment id must be exactly 16 hex characters")
        if self.raw == ZERO_PID:
            raise InvalidPaymentId("payment id must not be all zeros")

    @classmethod
    def parse(cls, text: object) -> PaymentId:
        """Parse 16 hex characters of any case; the all-zero id is refused."""
        return cls(_parse_hex(text, PID_BYTES, "payment id", InvalidPaymentId))

    @classmethod
    def generate(cls) -> PaymentId:
        while True:
            raw = secrets.token_bytes(PID_BYTES)
            if raw != ZERO_PID:
                return cls(raw)

    def hex(self) -> str:
        return self.raw.hex()

    def redacted(self) -> str:
        """Short prefix for logs: never log a whole payment id."""
        return self.raw[:2].hex() + "…"

    def __str__(self) -> str:
        return self.redacted()

    def __repr__(self) -> str:
        return f"PaymentId({self.redacted()})"


@dataclass(frozen=True, slots=True)
class ServiceToken:
    """The 32-byte token a claim issues."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != TOKEN_BYTES:
            raise InvalidToken("service token must be exactly 64 hex characters")

    @classmethod
    def parse(cls, text: object) -> ServiceToken:
        return cls(_parse_hex(text, TOKEN_BYTES, "service token", InvalidToken))

    def hex(self) -> str:
        return self.raw.hex()

    def redacted(self) -> str:
        return self.raw[:3].hex() + "…"

    def __str__(self) -> str:
        return self.redacted()

    def __repr__(self) -> str:
        return f"ServiceToken({self.redacted()})"


def redact_txid(txid: str | bytes) -> str:
    text = txid.hex() if isinstance(txid, bytes) else txid
    return text[:6] + "…"
