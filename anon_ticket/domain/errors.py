"""The errors the domain raises: the root of the project's one hierarchy and the client
mistakes found while parsing. anon_ticket/errors.py re-exports them beside the rest."""

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
