"""The bottom layer actors and supervisors both use: mailboxes, their errors, the dispatch of
messages to handlers, and a connection's outbound queue (docs/architecture.md §2). It imports
nothing of the application, the actors or the supervisors."""

from mailboxes.dispatch import Dispatch, unhandled
from mailboxes.errors import MailboxError, Unavailable, Unhandled, raise_as
from mailboxes.mailbox import (
    AnyMailbox,
    Asks,
    Envelope,
    Failure,
    Mailbox,
    Reply,
    ReplyTo,
    Tells,
)
from mailboxes.outbox import Outbox

__all__ = [
    "AnyMailbox",
    "Asks",
    "Dispatch",
    "Envelope",
    "Failure",
    "Mailbox",
    "MailboxError",
    "Outbox",
    "Reply",
    "ReplyTo",
    "Tells",
    "Unavailable",
    "Unhandled",
    "raise_as",
    "unhandled",
]
