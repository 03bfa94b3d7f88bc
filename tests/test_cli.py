"""The command line's shape: settings after the subcommand, help for every option."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from anon_ticket.cli import _settings, build_parser
from anon_ticket.config import _SPECS


def test_settings_are_accepted_after_serve_too(tmp_path: Path) -> None:
    # The CLI's own hints say `anon-ticket serve --dev-chain`.
    args = build_parser().parse_args(["--data-dir", str(tmp_path), "serve", "--dev-chain",
                                      "--bind-address", "127.0.0.1:9999"])
    settings = _settings(args, {})
    assert settings.dev_chain is True
    assert settings.bind_address == "127.0.0.1:9999"
    assert settings.data_dir == tmp_path  # given before the command, not reset after it
    before = _settings(build_parser().parse_args(["--dev-chain", "serve"]), {})
    assert before.dev_chain is True


def test_serve_help_lists_every_setting() -> None:
    done = subprocess.run([sys.executable, "-m", "anon_ticket", "serve", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    for spec in _SPECS:
        assert spec.flag in done.stdout, spec.flag


def _parsers(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield parser.prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _parsers(child)


def test_every_option_has_help() -> None:
    missing = [f"{prog}: {action.dest}" for prog, parser in _parsers(build_parser())
               for action in parser._actions
               if not isinstance(action, argparse._SubParsersAction) and not action.help]
    assert not missing
