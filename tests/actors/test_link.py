"""A worker's link (actors/link.py): what it answers itself and what it relays."""

from __future__ import annotations

import socket
from typing import Any

import apsw

from actors.link import Link
from anon_ticket.domain.ids import PaymentId
from anon_ticket.domain.messages import Claim
from anon_ticket.metrics import Metrics
from mailboxes import Envelope, Mailbox
from tests.actors.core import ReplySlot


class BusyReader:
    def claimed(self, pid: PaymentId) -> Any:
        raise apsw.BusyError("database is locked")

    def token_info(self, token: Any) -> Any:
        raise apsw.BusyError("database is locked")


async def test_a_local_read_that_fails_is_asked_of_the_owner_not_a_crash() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        link = Link(1, ours, storage=Mailbox("storage"), poller=Mailbox("poller"),
                    filter_=Mailbox("filter"), hub=Mailbox("hub"), public=Mailbox("public"),
                    metrics=Metrics(), reader=BusyReader())  # type: ignore[arg-type]
        slot = ReplySlot()
        link._relay(Envelope(Claim(PaymentId.generate()), slot, float("inf")))
        assert [m[0] for m in link._out] == ["ask"] and not slot.done.is_set()
