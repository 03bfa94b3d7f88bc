"""What the mailbox layer raises itself, and how an application has it raise its own.

This layer imports nothing of the application (docs/architecture.md §2), yet whoever asks an
actor catches one error hierarchy, the application's. So an application names, once, the
subclasses of these it wants (`raise_as`; anon_ticket/errors.py does) and the mailbox raises
those from then on.
"""

from __future__ import annotations


class MailboxError(Exception):
    """Base of what the mailbox layer raises."""


class Unavailable(MailboxError):
    """The actor cannot answer now: not serving (restarting, stopped), no answer within the
    request's deadline, or its mailbox full. Worth asking again after `retry_after` seconds."""

    def __init__(self, reason: str, retry_after: int = 1) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class Unhandled(MailboxError):
    """An actor got a request it has no handler for: the sender's mistake, answered at once
    (never a crash of the actor, never a wait for the deadline)."""

    def __init__(self, actor: str, message: str) -> None:
        super().__init__(f"{actor} has no handler for {message}")
        self.actor = actor
        self.message = message


class _Raised:
    """The classes the layer raises: its own until an application names subclasses."""

    __slots__ = ("unavailable", "unhandled")

    def __init__(self) -> None:
        self.unavailable: type[Unavailable] = Unavailable
        self.unhandled: type[Unhandled] = Unhandled


raised = _Raised()


def raise_as(unavailable: type[Unavailable], unhandled: type[Unhandled]) -> None:
    """Raise these subclasses (inside the application's own hierarchy) from now on."""
    raised.unavailable = unavailable
    raised.unhandled = unhandled
