"""Reads a worker process answers from the database itself (docs/architecture.md §8): a
claimed ticket's `already_claimed` and a token's introspection. The same statements serve
the storage actor, so the two cannot differ.

Correct on a read-only connection in another process: a read in WAL mode sees every
transaction committed before it began and never blocks the writer; a claimed ticket's token
never changes, and the answer's balance and revocation are those committed when it ran.
"""

from __future__ import annotations

from typing import Any

import apsw

from anon_ticket.domain.ids import PaymentId, ServiceToken
from anon_ticket.domain.messages import Claimed, ClaimStatus, TokenInfo

NOT_FOUND = "payment not found"  # the API's words for an unknown id or token
TOKEN_INFO = ("SELECT pid, amount, claimed_at, revoked_at, abuse_score, revoke_reason "
              "FROM tickets WHERE token = ?")
CLAIMED = "SELECT amount, token FROM tickets WHERE pid = ? AND token IS NOT NULL"


def token_info_row(row: tuple[Any, ...]) -> tuple[bytes, TokenInfo]:
    pid, amount, issued, revoked_at, score, reason = row
    return pid, TokenInfo(revoked_at is not None, amount, issued, revoked_at, score, reason)


class Reader:
    """A read-only connection of a worker's own."""

    def __init__(self, path: str) -> None:
        self.conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
        self.conn.setbusytimeout(1000)
        self._cur = self.conn.cursor()

    def _one(self, sql: str, args: tuple[Any, ...]) -> Any:
        rows = self._cur.execute(sql, args).fetchall()
        return rows[0] if rows else None

    def token_info(self, token: ServiceToken) -> TokenInfo | None:
        row = self._one(TOKEN_INFO, (token.raw,))
        return None if row is None else token_info_row(row)[1]

    def claimed(self, pid: PaymentId) -> Claimed | None:
        """The `already_claimed` answer of a claimed ticket; None when it is not claimed (or
        unknown): then only storage may answer."""
        row = self._one(CLAIMED, (pid.raw,))
        if row is None:
            return None
        return Claimed(ClaimStatus.ALREADY_CLAIMED, ServiceToken(row[1]), row[0])

    def close(self) -> None:
        self.conn.close()
