"""Payment ids, service tokens and token derivation (docs/architecture.md §6): exact
client-facing messages."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from anon_ticket.domain.ids import PaymentId, ServiceToken, redact_txid
from anon_ticket.domain.tokens import Derivation, derive, derive_hmac, derive_legacy
from anon_ticket.errors import InvalidInput, InvalidPaymentId, InvalidToken

PID_LENGTH = "invalid payment id: payment id must be exactly 16 hex characters"
PID_NONHEX = "invalid payment id: payment id contains non-hex characters"
PID_ZERO = "invalid payment id: payment id must not be all zeros"
TOKEN_LENGTH = "invalid token: service token must be exactly 64 hex characters"
TOKEN_NONHEX = "invalid token: service token contains non-hex characters"


def raises_exactly(exc: type[Exception], message: str, func: object, arg: object) -> None:
    with pytest.raises(exc) as info:
        func(arg)  # type: ignore[operator]
    assert str(info.value) == message
    assert isinstance(info.value, InvalidInput)


# --- PaymentId -------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["0123456789abcdef", "0123456789ABCDEF", "0123456789aBcDeF"])
def test_pid_parse_any_case(text: str) -> None:
    pid = PaymentId.parse(text)
    assert pid.raw == bytes.fromhex("0123456789abcdef")
    assert pid.hex() == "0123456789abcdef"
    assert pid == PaymentId.parse(text.upper())


@given(st.binary(min_size=8, max_size=8).filter(any))
def test_pid_hex_round_trip(raw: bytes) -> None:
    pid = PaymentId(raw)
    assert PaymentId.parse(pid.hex()) == pid
    assert PaymentId.parse(pid.hex().upper()) == pid


@pytest.mark.parametrize("text", ["", "0", "0123456789abcde", "0123456789abcdef0",
                                  "0123456789abcdef" * 4, " 0123456789abcdef"])
def test_pid_wrong_length(text: str) -> None:
    raises_exactly(InvalidPaymentId, PID_LENGTH, PaymentId.parse, text)


@pytest.mark.parametrize("text", ["0123456789abcdeg", "0123456789abcde ", "0x23456789abcdef",
                                  "0123456789abcdeé", "0123456789abcde\u0661",
                                  "０１２３４５６７８９ａｂｃｄｅｆ", "é" * 16, "-123456789abcdef"])
def test_pid_non_hex(text: str) -> None:
    assert len(text) == 16
    raises_exactly(InvalidPaymentId, PID_NONHEX, PaymentId.parse, text)


def test_pid_all_zero() -> None:
    raises_exactly(InvalidPaymentId, PID_ZERO, PaymentId.parse, "0" * 16)
    raises_exactly(InvalidPaymentId, PID_ZERO, PaymentId, bytes(8))


@pytest.mark.parametrize("value", [123, None, ["0123456789abcdef"], b"0123456789abcdef",
                                   1.5, {"pid": "0123456789abcdef"}])
def test_pid_non_str(value: object) -> None:
    raises_exactly(InvalidPaymentId, PID_LENGTH, PaymentId.parse, value)


def test_pid_raw_length_checked() -> None:
    raises_exactly(InvalidPaymentId, PID_LENGTH, PaymentId, b"\x01" * 7)


def test_pid_generate() -> None:
    seen = set()
    for _ in range(200):
        pid = PaymentId.generate()
        assert len(pid.raw) == 8
        assert pid.raw != bytes(8)
        seen.add(pid)
    assert len(seen) == 200


def test_pid_generate_skips_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    import secrets

    draws = iter([bytes(8), bytes(8), b"\x00" * 7 + b"\x01"])
    monkeypatch.setattr(secrets, "token_bytes", lambda n: next(draws))
    assert PaymentId.generate().raw == b"\x00" * 7 + b"\x01"


def test_pid_redacted() -> None:
    pid = PaymentId.parse("0123456789abcdef")
    for text in (pid.redacted(), str(pid), repr(pid), f"{pid}"):
        assert "0123456789abcdef" not in text
        assert "456789" not in text


# --- ServiceToken ----------------------------------------------------------------------------

TOKEN_HEX = "369e0f7c09124783e45fa6a6b7588733e362e2917f36fb7036f49284c1952fa9"


def test_token_parse_any_case() -> None:
    token = ServiceToken.parse(TOKEN_HEX)
    assert token.hex() == TOKEN_HEX
    assert ServiceToken.parse(TOKEN_HEX.upper()) == token
    mixed = "".join(c.upper() if i % 2 else c for i, c in enumerate(TOKEN_HEX))
    assert ServiceToken.parse(mixed) == token


@pytest.mark.parametrize("text", ["", TOKEN_HEX[:-1], TOKEN_HEX + "0", "0123456789abcdef"])
def test_token_wrong_length(text: str) -> None:
    raises_exactly(InvalidToken, TOKEN_LENGTH, ServiceToken.parse, text)


@pytest.mark.parametrize("text", [TOKEN_HEX[:-1] + "g", TOKEN_HEX[:-1] + "é",
                                  "é" * 64, TOKEN_HEX[:-1] + " "])
def test_token_non_hex(text: str) -> None:
    assert len(text) == 64
    raises_exactly(InvalidToken, TOKEN_NONHEX, ServiceToken.parse, text)


@pytest.mark.parametrize("value", [1, None, [TOKEN_HEX], TOKEN_HEX.encode()])
def test_token_non_str(value: object) -> None:
    raises_exactly(InvalidToken, TOKEN_LENGTH, ServiceToken.parse, value)


def test_token_all_zero_is_a_valid_token() -> None:
    # Only payment ids refuse zero; a token is whatever was stored.
    assert ServiceToken.parse("0" * 64).raw == bytes(32)


def test_token_redacted() -> None:
    token = ServiceToken.parse(TOKEN_HEX)
    for text in (token.redacted(), str(token), repr(token)):
        assert TOKEN_HEX not in text
        assert TOKEN_HEX[8:24] not in text


def test_redact_txid() -> None:
    txid = "ab" * 32
    assert redact_txid(txid) == "ababab…"
    assert redact_txid(bytes.fromhex(txid)) == "ababab…"


# --- Derivation ------------------------------------------------------------------------------

def test_legacy_vector() -> None:
    pid = PaymentId.parse("0123456789abcdef")
    assert derive_legacy(pid, "tx1").hex() == TOKEN_HEX
    # The message uses the lowercase hex of the pid, whatever case the client sent.
    assert derive_legacy(PaymentId.parse("0123456789ABCDEF"), "tx1").hex() == TOKEN_HEX
    assert derive(Derivation.LEGACY, b"ignored", pid, "tx1").hex() == TOKEN_HEX


def test_hmac_deterministic_and_keyed() -> None:
    pid = PaymentId.parse("0123456789abcdef")
    a1 = derive_hmac(b"secret-a" * 4, pid, "tx1")
    a2 = derive_hmac(b"secret-a" * 4, pid, "tx1")
    b = derive_hmac(b"secret-b" * 4, pid, "tx1")
    assert a1 == a2
    assert a1 != b
    assert a1.hex() != TOKEN_HEX
    assert derive_hmac(b"secret-a" * 4, pid, "tx2") != a1
    assert derive_hmac(b"secret-a" * 4, PaymentId.parse("0123456789abcdee"), "tx1") != a1
    assert derive(Derivation.HMAC, b"secret-a" * 4, pid, "tx1") == a1
    assert len(a1.raw) == 32
