"""Session fixtures shared by the whole suite."""

from tests.chain import regtest_chain
from tests.pgserver import pg_dsn, pg_server

__all__ = ["pg_dsn", "pg_server", "regtest_chain"]
