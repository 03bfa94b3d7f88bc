"""Session fixtures shared by the whole suite."""

from tests.chain import regtest_chain

__all__ = ["regtest_chain"]
