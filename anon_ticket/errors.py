"""The one error hierarchy of anon-ticket.

Client mistakes are `InvalidInput` (HTTP 400) or `NotFound` (404); anything that is worth
retrying is `Unavailable` (503 with Retry-After); configuration problems are `ConfigError`
(exit 2). The root and the parsing errors are the domain's (anon_ticket/domain/errors.py);
`Unavailable` and `Unhandled` are the mailbox layer's, subclassed here so that the mailbox
raises ours (docs/architecture.md §2). The HTTP mapping is `anon_ticket.web.error_response`.
"""

from __future__ import annotations

import mailboxes
from anon_ticket.domain.errors import (
    AnonTicketError,
    InvalidAddress,
    InvalidInput,
    InvalidPaymentId,
    InvalidToken,
)

__all__ = [
    "AnonTicketError",
    "BackupFailed",
    "ConfigError",
    "DataDirLocked",
    "InvalidAddress",
    "InvalidInput",
    "InvalidPaymentId",
    "InvalidToken",
    "NotFound",
    "RpcBusy",
    "RpcCallError",
    "RpcError",
    "RpcProtocolError",
    "RpcTimeout",
    "RpcUnavailable",
    "StorageError",
    "Unavailable",
    "Unhandled",
]


class BackupFailed(InvalidInput):
    """A backup cannot be written where the operator asked: an unusable destination, or a
    write failure there (permissions, no space, a read-only file system).

    The service is fine and retrying the same place fails again: a 400 whose message says
    what to change (another place, or free space)."""


class NotFound(AnonTicketError):
    """The thing asked for does not exist (or is not claimable yet)."""


class Unavailable(AnonTicketError, mailboxes.Unavailable):
    """A transient condition: an actor restarting, a lost batch, a deadline, draining.

    The client should retry after `retry_after` seconds; nothing was done.
    """


class Unhandled(AnonTicketError, mailboxes.Unhandled):
    """An actor got a request it has no handler for: a bug (500), never a client's doing."""


mailboxes.raise_as(Unavailable, Unhandled)


class ConfigError(AnonTicketError):
    """The configuration cannot be used; each problem is one line of the message."""

    restartable = False  # restarting an actor cannot fix it: the supervisor lets it through

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class DataDirLocked(AnonTicketError):
    """Another process holds the data directory."""


class StorageError(AnonTicketError):
    """The database refused or failed; never shown to clients verbatim."""


class RpcError(AnonTicketError):
    """monero-wallet-rpc (or monerod) could not serve a call."""


class RpcUnavailable(RpcError):
    """Nothing answers at the RPC address (refused, reset, DNS)."""


class RpcTimeout(RpcError):
    """The call took longer than its method's timeout."""


class RpcProtocolError(RpcError):
    """An answer that is not the JSON-RPC we expect (HTML, bad JSON, missing fields, 401)."""


class RpcBusy(RpcError):
    """The wallet's daemon is busy (syncing): a wait, not a fault."""


class RpcCallError(RpcError):
    """The RPC answered with an error object."""

    def __init__(self, method: str, code: int, message: str) -> None:
        super().__init__(f"{method}: error {code}: {message}")
        self.method = method
        self.code = code
        self.rpc_message = message
