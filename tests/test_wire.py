"""The owner <-> worker link's frames and messages (anon_ticket/wire.py): every message that
crosses comes back as it went, frames cut anywhere are reassembled, and anything else is
refused."""

from __future__ import annotations

import os

import pytest

from anon_ticket.domain.commands import PollerStatus, StorageHealth
from anon_ticket.domain.ids import PaymentId, ServiceToken
from anon_ticket.domain.messages import (
    CacheClaim,
    Claim,
    Claimed,
    ClaimStatus,
    Committed,
    Confirmations,
    EventKind,
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
from anon_ticket.errors import InvalidInput, NotFound, Unavailable
from anon_ticket.wire import (
    HEADER,
    MAX_FRAME,
    FrameReader,
    WireError,
    decode_ask,
    decode_committed,
    decode_failure,
    decode_note,
    decode_reply,
    encode_ask,
    encode_failure,
    encode_push,
    encode_reply,
    frame,
)

PID = PaymentId.generate()
TOKEN = ServiceToken(os.urandom(32))


@pytest.mark.parametrize("request_", [
    Claim(PID), LookupToken(TOKEN), ReadTicketState(pid=PID), ReadTicketState(token=TOKEN),
    PollerStatus(), StorageHealth()])
def test_every_request_a_worker_asks_crosses_unchanged(request_: object) -> None:
    what, arg = encode_ask(request_)
    [message] = FrameReader().feed(frame([["ask", 1, what, arg]]))
    assert decode_ask(message[2], message[3])[1] == request_


@pytest.mark.parametrize("answer", [
    Claimed(ClaimStatus.SUCCESS, TOKEN, 5), Claimed(ClaimStatus.ALREADY_CLAIMED, TOKEN, 0),
    TokenInfo(True, 7, "2026-12-03T10:00:00Z", "2026-12-03T11:00:00Z", -3, "abuse"),
    TokenInfo(False, 7, "2026-12-03T10:00:00Z", None, 0),
    TicketState(PID, None, 0, 99, "waiting", 0), TicketState(PID, TOKEN, 3, 99, "claimed", 8),
    {"state": "ok", "lag_blocks": 0, "last_error": None}])
def test_every_answer_crosses_unchanged(answer: object) -> None:
    shape, value = encode_reply(answer)
    [message] = FrameReader().feed(frame([["reply", 1, shape, value]]))
    assert decode_reply(message[2], message[3]) == answer


def test_failures_keep_their_kind_words_and_retry_after() -> None:
    for error in (NotFound("payment not found"), InvalidInput("invalid request: x"),
                  Unavailable("storage is not available", retry_after=3)):
        back = decode_failure(*encode_failure(error))
        assert type(back) is type(error) and str(back) == str(error)
    assert decode_failure(*encode_failure(Unavailable("x", retry_after=3))).retry_after == 3
    assert str(decode_failure(*encode_failure(RuntimeError("secret detail")))) == \
        "owner failed: RuntimeError"  # a bug's text stays in the owner


def test_pushes_cross_unchanged() -> None:
    event = TicketEvent(EventKind.TOPPED_UP, PID, TOKEN, 4, 77, (("amount", 5), ("balance", 9)))
    committed = Committed((CacheClaim(PID, TOKEN, 9), Invalidate((PID,)), Publish((event,))))
    what, value = encode_push(committed)
    [message] = FrameReader().feed(frame([["push", None, what, value]]))
    assert decode_committed(message[3]) == committed
    for note in (PaymentSeen(PID, "ab" * 32, 5, None, 0, 10),
                 Confirmations(PID, "ab" * 32, 3, 10), SightingGone(PID, "ab" * 32)):
        what, value = encode_push(note)
        assert decode_note(what, FrameReader().feed(frame([[what, value]]))[0][1]) == note


def test_frames_cut_anywhere_are_reassembled_in_order() -> None:
    stream = b"".join(frame([["beat"], ["ack", i]]) for i in range(50))
    for size in (1, 3, 7, 64, len(stream)):
        reader, got = FrameReader(), []
        for i in range(0, len(stream), size):
            got.extend(reader.feed(stream[i:i + size]))
        assert got == [m for i in range(50) for m in (["beat"], ["ack", i])]


def test_what_is_not_a_message_of_the_link_is_refused() -> None:
    with pytest.raises(WireError):
        FrameReader().feed(HEADER.pack(MAX_FRAME + 1))  # too large: refused before reading
    with pytest.raises(WireError):
        FrameReader().feed(HEADER.pack(3) + b"\xc1\xc1\xc1")  # not msgpack
    with pytest.raises(WireError):
        decode_ask("backup", "/etc/passwd")  # not something a worker may ask
    with pytest.raises(WireError):
        decode_ask("claim", b"\x00" * 8)  # the all-zero id is no payment id
    with pytest.raises(WireError):
        decode_ask("token", "not bytes")
    with pytest.raises(WireError):
        encode_ask(object())
