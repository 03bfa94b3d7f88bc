"""What the tree tells its actors (supervisors/tree.py)."""

from __future__ import annotations

from pathlib import Path

from actors.public import Public
from supervisors.tree import build_tree
from tests.harness import make_settings


def _public(tmp_path: Path, **overrides: object) -> Public:
    tree = build_tree(make_settings(tmp_path / "data", **overrides), b"s" * 32)
    spec = next(c.spec for c in tree.root._children if c.spec.name == "public")
    actor = spec.factory()
    assert isinstance(actor, Public)
    return actor


async def test_the_dev_chain_says_it_is_regtest(tmp_path: Path) -> None:
    # A regtest wallet's addresses carry mainnet's prefixes; /api/v1/info said "mainnet".
    assert _public(tmp_path, dev_chain="true").config.network == "regtest"
    assert _public(tmp_path).config.network is None  # learnt from the wallet's address
