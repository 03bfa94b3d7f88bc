"""Monero integrated addresses: the operator's primary address + a payment id (pure).

A thin, strict wrapper over the `monero` package (1.1.1). Every failure of that package (it
raises ValueError for bad length, base58 overflow, checksum and network byte, TypeError for
subaddresses) becomes `InvalidAddress` with a reason of our own: its messages echo the input and
are not part of our contract.

Network names are "mainnet", "stagenet" and "testnet" (the package itself says "main", "stage",
"test"). A regtest chain uses mainnet-format addresses, so a regtest address reports "mainnet".

Building costs about 0.12 ms and `parse_integrated` about 0.2 ms (pure-Python base58 and keccak;
rebuilding the base address is half of it): fine for occasional calls, not for a hot path.
"""

from __future__ import annotations

import functools

from monero.address import Address, IntegratedAddress, SubAddress
from monero.address import address as _parse_any

from anon_ticket.domain.errors import InvalidAddress
from anon_ticket.domain.ids import PID_BYTES, PaymentId

__all__ = ["integrated_address", "network_of", "parse_integrated", "validate_primary"]

_NETWORKS = {"main": "mainnet", "stage": "stagenet", "test": "testnet"}
_STANDARD_LEN = 95
_INTEGRATED_LEN = 106


def _kind(obj: object) -> str:
    # IntegratedAddress is a subclass of Address in the monero package: test it first.
    if isinstance(obj, IntegratedAddress):
        return "an integrated address"
    if isinstance(obj, SubAddress):
        return "a subaddress"
    return "a standard address"


def _parse(text: object, what: str) -> Address | SubAddress | IntegratedAddress:
    """Parse any Monero address kind; InvalidAddress for anything that is not one."""
    if not isinstance(text, str):
        raise InvalidAddress(f"{what} must be a string")
    if len(text) not in (_STANDARD_LEN, _INTEGRATED_LEN):
        raise InvalidAddress(
            f"{what} must be {_STANDARD_LEN} (standard) or {_INTEGRATED_LEN} (integrated) "
            f"base58 characters, not {len(text)}")
    try:
        obj = _parse_any(text)
        canonical = str(obj)
    except ValueError as exc:
        message = str(exc)
        if "checksum" in message:
            reason = "bad checksum"
        elif "netbyte" in message:
            reason = "unknown network byte"
        else:
            reason = "bad base58 encoding"
        raise InvalidAddress(f"{what} is not a Monero address ({reason})") from None
    except Exception:  # anything else the package may raise on hostile input
        raise InvalidAddress(f"{what} is not a Monero address") from None
    if canonical != text:  # defensive: accept only the canonical encoding
        raise InvalidAddress(f"{what} is not in canonical base58 form")
    return obj


def _network(obj: Address | SubAddress | IntegratedAddress) -> str:
    try:
        return _NETWORKS[obj.net]
    except (KeyError, ValueError, IndexError):  # pragma: no cover - parse already checked it
        raise InvalidAddress("unknown Monero network") from None


@functools.lru_cache(maxsize=16)
def _standard(primary: str) -> tuple[Address, str]:
    """The parsed primary address and its network (cached: the primary rarely changes)."""
    obj = _parse(primary, "primary address")
    if isinstance(obj, IntegratedAddress | SubAddress) or not isinstance(obj, Address):
        raise InvalidAddress(
            f"primary address must be a standard (primary) address, not {_kind(obj)}")
    return obj, _network(obj)


def network_of(primary: str) -> str:
    """The network ("mainnet", "stagenet" or "testnet") of any valid Monero address.

    Accepts a standard address, a subaddress or an integrated address; raises InvalidAddress for
    anything else. Use `validate_primary` to also insist on a standard address.
    """
    return _network(_parse(primary, "address"))


def validate_primary(primary: str) -> str:
    """Check that `primary` is a standard (primary) address and return its network.

    Subaddresses and integrated addresses are refused: an integrated address can only be built
    on a standard address.
    """
    if not isinstance(primary, str):
        raise InvalidAddress("primary address must be a string")
    return _standard(primary)[1]


def integrated_address(primary: str, pid: PaymentId) -> str:
    """The integrated address that pays `primary` with payment id `pid`."""
    if not isinstance(primary, str):
        raise InvalidAddress("primary address must be a string")
    if not isinstance(pid, PaymentId):
        raise TypeError(f"pid must be a PaymentId, not {type(pid).__name__}")
    base, _ = _standard(primary)
    try:
        # The package refuses raw bytes (despite its message): it takes hex or an int.
        return str(base.with_payment_id(pid.hex()))
    except Exception:  # pragma: no cover - a validated primary and 8-byte pid cannot fail
        raise InvalidAddress("cannot integrate this payment id into the primary address"
                             ) from None


def parse_integrated(address: str) -> tuple[str, PaymentId, str]:
    """Split an integrated address into (primary address, payment id, network).

    Raises InvalidAddress for anything that is not an integrated address, and InvalidPaymentId
    for the all-zero payment id.
    """
    obj = _parse(address, "integrated address")
    if not isinstance(obj, IntegratedAddress):
        raise InvalidAddress(f"expected an integrated address, not {_kind(obj)}")
    try:
        raw = int(obj.payment_id()).to_bytes(PID_BYTES, "big")
        primary = str(obj.base_address())
    except Exception:  # pragma: no cover - the length check in _parse pins 8 bytes
        raise InvalidAddress("integrated address carries no valid payment id") from None
    return primary, PaymentId(raw), _network(obj)
