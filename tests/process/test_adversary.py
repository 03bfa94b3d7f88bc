"""The adversary suite, bounded, against the real process (docs/architecture.md, "Hostile
clients"): every attack in the catalog must fail to do harm."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.adversary.__main__ import main

pytestmark = pytest.mark.process


def test_the_bounded_adversary_suite_finds_nothing(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    _finds_nothing(tmp_path, capsys)


def test_the_bounded_adversary_suite_finds_nothing_on_postgresql(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], pg_dsn: str) -> None:
    """The same attacks against a server whose store is PostgreSQL (the redeem races then
    meet its conditional claim, the slow clients its reconnecting storage)."""
    _finds_nothing(tmp_path, capsys, "--database-url", pg_dsn)


def _finds_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: str) -> None:
    out = tmp_path / "report.json"
    code = main(["--out", str(out), *args])
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["attacks"] >= 60
    assert code == 0 and report["passed"], printed
