"""Moved to the `mailboxes` package (docs/architecture.md §2); these names stay importable
from here for the benchmark (tests/bench/) and the tests that still import them. New code
imports `mailboxes`."""

from mailboxes.mailbox import Envelope, Failure, Mailbox, Reply, _deadlines

__all__ = ["Envelope", "Failure", "Mailbox", "Reply", "_deadlines"]
