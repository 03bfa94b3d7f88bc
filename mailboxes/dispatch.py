"""How every actor maps the messages it takes to its handlers (docs/architecture.md §2).

What an actor has no handler for is never a crash and never a wait: a request is answered at
once with an `Unhandled` failure naming the actor and the message type, a notice (nobody
waits for it) is logged and dropped. The actor goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from mailboxes.errors import raised
from mailboxes.mailbox import Envelope

# A handler answers (or starts the work) synchronously, or returns what the actor's loop
# awaits before the next message (an actor whose handlers wait, as the poller's rescan does).
Handler = Callable[[Envelope[Any]], Awaitable[None] | None]

_log = logging.getLogger("mailboxes")


def unhandled(actor: str, env: Envelope[Any]) -> None:
    """Answer (a request) or log (a notice) a message `actor` has no handler for."""
    kind = type(env.msg).__name__
    if env.reply_to is not None:
        env.fail(raised.unhandled(actor, kind))
    else:
        # One fixed event with its fields, in the shape `anon_ticket.logs` formats (this layer
        # imports none of the application): docs/logs.md lists it.
        _log.warning("notice dropped: no handler", extra={"actor": actor,
                                                          "fields": {"notice": kind}})


class Dispatch:
    """Message type → handler, for one actor; calling it handles one envelope (it can be
    handed to `Mailbox.serve` as it is) and returns what the handler returned."""

    __slots__ = ("_get", "actor")

    def __init__(self, actor: str, handlers: Mapping[type[Any], Handler]) -> None:
        self.actor = actor
        self._get = dict(handlers).get

    def __call__(self, env: Envelope[Any]) -> Awaitable[None] | None:
        handler = self._get(type(env.msg))
        if handler is None:
            unhandled(self.actor, env)
            return None
        return handler(env)
