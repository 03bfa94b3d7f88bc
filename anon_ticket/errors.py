"""The one error hierarchy of anon-ticket.

Client mistakes are `InvalidInput` (HTTP 400) or `NotFound` (404); anything that is worth
retrying is `Unavailable` (503 with Retry-After); configuration problems are `ConfigError`
(exit 2). The HTTP mapping lives in `actors/public.py` alone.
"""

from __future__ import annotations


class AnonTicketError(Exception):
    """Base of every error this project raises on purpose."""


class InvalidInput(AnonTicketError):
    """A client sent something malformed; the message is safe to show to that client."""


class InvalidPaymentId(InvalidInput):
    def __init__(self, reason: str) -> None:
        super().__init__(f"invalid payment id: {reason}")


class InvalidToken(InvalidInput):
    def __init__(self, reason: str) -> None:
        super().__init__(f"invalid token: {reason}")


class InvalidAddress(InvalidInput):
    def __init__(self, reason: str) -> None:
        super().__init__(f"invalid address: {reason}")


class BackupFailed(InvalidInput):
    """A backup cannot be written where the operator asked: an unusable destination, or a
    write failure there (permissions, no space, a read-only file system).

    The service is fine and retrying the same place fails again: a 400 whose message says
    what to change (another place, or free space)."""


class NotFound(AnonTicketError):
    """The thing asked for does not exist (or is not claimable yet)."""


class Unavailable(AnonTicketError):
    """A transient condition: an actor restarting, a lost batch, a deadline, draining.

    The client should retry after `retry_after` seconds; nothing was done.
    """

    def __init__(self, reason: str, retry_after: int = 1) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class ConfigError(AnonTicketError):
    """The configuration cannot be used; each problem is one line of the message."""

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
