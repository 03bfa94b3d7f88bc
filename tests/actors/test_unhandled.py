"""A message an actor has no handler for (mailboxes/dispatch.py): a request is answered at once
with a failure naming the actor and the message type (not left to its deadline), a notice is
logged; either way the actor goes on, and nothing restarts. Every actor with a mailbox."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from anon_ticket.domain.commands import (
    FilterStats,
    HubStats,
    PollerStatus,
    StorageHealth,
    TreeStatus,
)
from anon_ticket.domain.messages import Notice, Request
from anon_ticket.errors import AnonTicketError, Unhandled
from anon_ticket.web import error_response
from tests.harness import Server, running_server


@dataclass(frozen=True, slots=True)
class Bogus(Request[None]):
    pass


@dataclass(frozen=True, slots=True)
class BogusNote(Notice):
    pass


def restarts(srv: Server) -> dict[str, int]:
    out: dict[str, int] = {}
    todo = list(srv.tree.root.status())
    while todo:
        state = todo.pop()
        out[state.name] = state.restarts
        todo.extend(state.children)
    return out


async def test_every_actor_answers_an_unknown_request_at_once_and_goes_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="mailboxes")
    async with running_server(tmp_path) as srv:
        mb = srv.tree.mailboxes
        boxes: dict[str, Any] = {"storage": mb.storage, "filter": mb.filter, "hub": mb.hub,
                                 "poller": mb.poller, "public": mb.public,
                                 "supervisor": mb.root}
        before = restarts(srv)
        for name, box in boxes.items():
            with trio.fail_after(2):  # not the request's own 30 s deadline
                with pytest.raises(Unhandled, match=f"^{name} has no handler for Bogus$"):
                    await box.ask(Bogus(), 30)
            box.tell(BogusNote())
        # Each still serves: a request it knows is answered after the notice.
        assert (await mb.storage.ask(StorageHealth(), 5))["writable"] is True
        assert "cache_entries" in await mb.filter.ask(FilterStats(), 5)
        assert "subscriptions" in await mb.hub.ask(HubStats(), 5)
        assert "state" in await mb.poller.ask(PollerStatus(), 5)
        with trio.fail_after(2), pytest.raises(Unhandled):  # public takes only Drain
            await mb.public.ask(Bogus(), 30)
        assert [s.name for s in await mb.root.ask(TreeStatus(), 5)]
        assert restarts(srv) == before
        assert all(box.serving for box in boxes.values())
    dropped = {(r.getMessage(), r.actor, r.fields["notice"])  # type: ignore[attr-defined]
               for r in caplog.records if r.name == "mailboxes"}
    assert dropped == {("notice dropped: no handler", name, "BogusNote") for name in boxes}


async def test_an_unhandled_request_is_a_server_error_for_http() -> None:
    error = Unhandled("storage", "Bogus")
    assert isinstance(error, AnonTicketError)
    assert error_response(error).status_code == 500
