"""The command line's shape (settings after the subcommand, help for every option), and what
`ctl` and `db check` print: tables for people, `--json` unchanged for scripts."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import trio

from anon_ticket import audit, schema, tables
from anon_ticket.cli import _settings, build_parser
from anon_ticket.config import _SPECS
from anon_ticket.datadir import DataDir
from anon_ticket.domain.ids import PaymentId
from anon_ticket.domain.messages import RecordTransfers, SkippedTransfer
from tests.harness import running_server


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


# --- ctl and db check: tables for people, --json unchanged for scripts -----------------------


def _kv(text: str) -> dict[str, str]:
    """A `label  value` block: labels and values are separated by two spaces or more."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if line.strip():
            parts = re.split(r"\s{2,}", line.strip(), maxsplit=1)
            out[parts[0]] = parts[1] if len(parts) > 1 else ""
    return out


def _rows(lines: list[str]) -> list[list[str]]:
    return [re.split(r"\s{2,}", line.strip()) for line in lines if line.strip()]


def _section(text: str, title: str) -> str:
    """The indented lines under a section's title line."""
    lines = text.splitlines()
    start = lines.index(title) + 1
    body = itertools.takewhile(lambda line: line.startswith("  "), lines[start:])
    return "\n".join(body)


def _old_format(data: object) -> str:
    """What ctl printed before it had tables (scripts parse it): `--json` keeps it."""
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


class Ctl:
    def __init__(self, tmp_path: Path, socket: Path) -> None:
        self.base = [sys.executable, "-m", "anon_ticket", "--data-dir", str(tmp_path / "ctl"),
                     "ctl", "--socket", str(socket)]

    async def __call__(self, *args: str) -> str:
        done = await trio.run_process([*self.base, *args], check=False, capture_stdout=True,
                                      capture_stderr=True)
        assert done.returncode == 0, (args, done.stderr.decode())
        assert done.stderr == b""
        return str(done.stdout.decode())

    async def both(self, *args: str) -> tuple[str, str]:
        """The table and `--json` at once (two processes)."""
        out: dict[bool, str] = {}

        async def one(as_json: bool) -> None:
            out[as_json] = await self(*args, *(["--json"] if as_json else []))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, False)
            nursery.start_soon(one, True)
        return out[False], out[True]


async def test_ctl_prints_tables_and_json_unchanged(tmp_path: Path) -> None:
    async with running_server(tmp_path) as srv:
        pid = PaymentId.generate()
        await srv.pay(pid, 1_500_000_000_000, height=40)
        token = (await srv.redeem(pid.hex())).json()["service_token"]
        dust = SkippedTransfer(os.urandom(32), "dust", 10**9, 50)
        await srv.tree.mailboxes.storage.ask(RecordTransfers((), skipped=(dust,), cursor=60), 5)
        ctl = Ctl(tmp_path, srv.settings.internal_socket_path)

        table, raw = await ctl.both("status")
        data = json.loads(raw)
        assert raw == _old_format(data)
        assert set(data) == {"actors", "storage", "poller"}
        assert data["storage"] == (await srv.internal.get("/admin/status")).json()["storage"]
        actors = _rows(_section(table, "actors").splitlines())
        assert actors[0] == ["NAME", "STATE", "UPTIME", "RESTARTS", "MAILBOX DEPTH",
                             "LAST ERROR"]
        names = {row[0]: row for row in actors[1:]}
        assert set(names) == {"core", "storage", "filter", "hub", "poller", "public",
                              "internal"}
        assert all(row[1] == "running" and row[3] == "0" for row in names.values())
        assert re.fullmatch(r"\d+(\.\d+)? (ms|s)", names["storage"][2])
        assert "\n    storage  " in table and "\n  hub  " in table  # core's children indented
        storage = _kv(_section(table, "storage"))
        assert storage == {"tickets": "1", "claimed": "1", "revoked": "0", "transfers": "1",
                           "skipped": "1", "cursor": "60", "write error": "-"}
        poller = _kv(_section(table, "poller"))
        assert poller["state"] == data["poller"]["state"] == "degraded"
        assert poller["wallet reachable"] == "no"
        assert poller["last error"] == data["poller"]["last_error"]
        before = await ctl("--json", "status")  # --json before the command too
        assert before == _old_format(json.loads(before)) and set(json.loads(before)) == set(data)

        table, raw = await ctl.both("bloom")
        figures = (await srv.internal.get("/admin/bloom")).json()
        assert raw == _old_format(figures)
        bloom = _kv(table)
        assert bloom["enabled"] == "yes" and bloom["entries"] == "1"
        assert bloom["memory"] == f"{figures['memory_bytes'] / 1024:.1f} KiB"
        assert bloom["configured fp rate"] == "1e-06"

        table, raw = await ctl.both("skipped")
        assert raw == _old_format((await srv.internal.get("/admin/skipped")).json())
        header, row = _rows(table.splitlines())
        assert header == ["TXID", "REASON", "AMOUNT", "HEIGHT", "RECORDED AT"]
        assert row[:4] == [dust.txid.hex(), "dust", "0.001 XMR", "50"]

        raw = await ctl("revoke", token, "--reason", "spam", "--abuse-score", "3", "--json")
        revoked = json.loads(raw)
        assert raw == _old_format(revoked)
        assert set(revoked) == {"status", "amount", "issued_at", "revoked_at", "abuse_score",
                                "reason"}
        table = _kv(await ctl("revoke", token))  # revoked already: the same answer
        assert table == {"status": "revoked", "amount": "1.5 XMR", "abuse score": "3",
                         "reason": "spam", "issued at": revoked["issued_at"],
                         "revoked at": revoked["revoked_at"]}

        raw = await ctl("backup", str(tmp_path / "a.tar"), "--json")
        written = json.loads(raw)
        assert raw == _old_format(written) and set(written) == {"path", "bytes", "seconds"}
        assert written["bytes"] == (tmp_path / "a.tar").stat().st_size
        table = _kv(await ctl("backup", str(tmp_path / "b.tar")))
        assert table["path"] == str(tmp_path / "b.tar")
        assert re.fullmatch(r"\d+\.\d KiB", table["size"])
        assert re.fullmatch(r"\d+(\.\d+)? (ms|s)", table["took"])

        paused = _kv(await ctl("poller", "pause"))
        assert paused["state"] == "paused" and paused["cursor"] == "-"
        raw = await ctl("poller", "resume", "--json")
        assert raw == _old_format(json.loads(raw))
        assert set(json.loads(raw)) == set(data["poller"])
        assert json.loads(raw)["state"] != "paused"
        table, raw = await ctl.both("poller", "rescan", "--from", "5")
        assert json.loads(raw)["cursor"] == 4 and _kv(table)["cursor"] == "4"

        table, raw = await ctl.both("restart", "filter")
        assert raw == _old_format({"restarted": "filter"})
        assert _kv(table) == {"restarted": "filter"}

        raw = await ctl("drain", "--json")
        assert raw == _old_format({"draining": True, "watchers_closing": 0})
        assert _kv(await ctl("drain")) == {"draining": "yes", "watchers closing": "0"}

        assert _kv(await ctl("shutdown")) == {"status": "shutting down"}
        with trio.fail_after(10):
            while srv.tree.root.stop_reason is None:
                await trio.sleep(0.01)
    async with running_server(tmp_path / "second") as srv:
        raw = await Ctl(tmp_path, srv.settings.internal_socket_path)("--json", "shutdown")
        assert raw == _old_format({"status": "shutting down"})


def test_db_check_prints_a_table_and_json_unchanged(tmp_path: Path) -> None:
    data = tmp_path / "data"
    db = [sys.executable, "-m", "anon_ticket", "--data-dir", str(data), "db", "check"]
    DataDir(data).ensure()
    schema.migrate(data / "anon-ticket.db")
    raw = subprocess.run([*db, "--json"], capture_output=True, text=True, timeout=60)
    assert raw.returncode == 0, raw.stderr
    summary = audit.summary(data / "anon-ticket.db")
    assert raw.stdout == _old_format(summary) + "ok\n"
    table = subprocess.run(db, capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    *rows, last = table.stdout.splitlines()
    assert last == "ok"
    assert _kv("\n".join(rows)) == {"tickets": "0", "claimed": "0", "revoked": "0",
                                    "transfers": "0", "vanished": "0", "skipped": "0",
                                    "cursor": "-"}


def test_table_units() -> None:
    assert [tables.xmr(n) for n in (0, 1, 10**12, 15 * 10**11, -5 * 10**11)] == [
        "0 XMR", "0.000000000001 XMR", "1 XMR", "1.5 XMR", "-0.5 XMR"]
    assert [tables.duration(s) for s in (0.0004, 0.008, 2.14, 75, 3700, 266400)] == [
        "0.40 ms", "8 ms", "2.1 s", "1 min 15 s", "1 h 1 min", "3 d 2 h"]
    assert [tables.size(n) for n in (512, 51200, 3 * 2**20)] == ["512 B", "50.0 KiB",
                                                                  "3.0 MiB"]
    assert tables.render({"last_error": "two\nlines", "ok": True, "none": None}) == (
        "last error  two lines\nok          yes\nnone        -")
    assert tables.render({"skipped": []}) == "skipped: none"
