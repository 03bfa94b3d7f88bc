"""The `anon-ticket` command line.

Global flags (every setting, `--config`) go before the subcommand. Exit codes: 0 ok,
1 failure, 2 usage or configuration, 3 not found (a redeem or token lookup that got 404),
4 timed out.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from anon_ticket import __version__, logs, tables
from anon_ticket.client import add_client_parsers, run_client
from anon_ticket.config import Settings, add_setting_flags, cli_values, load_settings
from anon_ticket.datadir import DataDir
from anon_ticket.devcli import add_dev_parser, run_dev
from anon_ticket.errors import (
    AnonTicketError,
    ConfigError,
    DataDirLocked,
    InvalidInput,
    StorageError,
)

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_TIMEOUT = 0, 1, 2, 3, 4
JSON_HELP = "print JSON (for scripts) instead of a table"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="anon-ticket",
        description="Anonymous access tickets sold for Monero.",
    )
    p.add_argument("--version", action="version", version=f"anon-ticket {__version__}")
    add_setting_flags(p)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the service (needs MONERO_RPC_URL or --dev-chain)",
                           description="Run the service. Every setting is accepted here or "
                           "before the command.")
    add_setting_flags(serve, after_command=True)

    pid = sub.add_parser("pid", help="payment ids").add_subparsers(dest="pid_cmd", required=True)
    new = pid.add_parser("new", help="draw a payment id and build its integrated address")
    new.add_argument("--address", required=True, help="the operator's primary address")

    ctl = sub.add_parser("ctl", help="steer a running server over its internal socket",
                         description="Answers are printed as tables; --json (before or "
                         "after the command) prints the server's JSON instead, for scripts.")
    ctl.add_argument("--socket", help="internal unix socket (default: the server's)")
    ctl.add_argument("--json", action="store_true", help=JSON_HELP)
    # `--json` after the command too; SUPPRESS keeps it from resetting one given before.
    json_flag = argparse.ArgumentParser(add_help=False)
    json_flag.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                           help=JSON_HELP)
    csub = ctl.add_subparsers(dest="ctl_cmd", required=True)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return csub.add_parser(name, help=text, parents=[json_flag])

    command("status", "the actor tree and storage counters")
    command("bloom", "Bloom filter and cache figures")
    sk = command("skipped", "transfers that did not qualify")
    sk.add_argument("--limit", type=int, default=100, help="at most this many (1..10000)")
    rv = command("revoke", "revoke a service token")
    rv.add_argument("token", help="the service token (64 hex)")
    rv.add_argument("--reason", help="why, kept with the token (at most 1024 characters)")
    rv.add_argument("--abuse-score", type=int, help="an integer from -32768 to 32767")
    bk = command("backup", "online backup written by the server")
    bk.add_argument("path", help="absolute path of the tar file the server writes")
    rs = command("restart", "restart one actor")
    rs.add_argument("actor", help="an actor as `ctl status` names it: storage, filter, hub, "
                    "poller, public, internal, core, fanout, worker-N, devchain")
    command("shutdown", "stop the server gracefully")
    command("drain", "answer claims with 503 and close watchers (before a stop)")
    pl = command("poller", "pause, resume or rescan the chain poller")
    pl.add_argument("action", choices=["pause", "resume", "rescan"], help="what to do")
    pl.add_argument("--from", dest="from_height", type=int,
                    help="with rescan: the first height to scan again")

    add_dev_parser(sub)
    add_client_parsers(sub)

    db = sub.add_parser("db", help="database maintenance").add_subparsers(
        dest="db_cmd", required=True)
    b = db.add_parser("backup", help="consistent backup (works while a server runs)")
    b.add_argument("path", help="the tar file to write")
    r = db.add_parser("restore", help="replace the database from a backup (server stopped)")
    r.add_argument("path", help="a tar file written by db backup")
    ck = db.add_parser("check", help="check the invariants of the database")
    ck.add_argument("--json", action="store_true", help=JSON_HELP)
    imp = db.add_parser("import-legacy", help="import the original anon-ticket's database "
                        "(into PostgreSQL: an empty database, through db copy)")
    imp.add_argument("path", help="the original's SQLite database file")
    imp.add_argument("--rescan-from", type=int, help="make the poller rescan from this height")
    cp = db.add_parser("copy", help="copy the SQLite database into an empty PostgreSQL "
                       "database, verified (works while a server runs)")
    cp.add_argument("--to", required=True, metavar="URL",
                    help="postgres://user@host/database, an empty database (the password may "
                    "come from PGPASSWORD or ~/.pgpass rather than the command line)")
    cp.add_argument("--json", action="store_true", help=JSON_HELP)
    return p


def _settings(args: argparse.Namespace, env: dict[str, str] | None = None) -> Settings:
    config_file = Path(args.config) if getattr(args, "config", None) else None
    return load_settings(cli_values(args), env if env is not None else dict(os.environ),
                         config_file)


def _print(data: Any, as_json: bool = True) -> None:
    """An answer for scripts (JSON, keys sorted: the format `--json` keeps) or people."""
    print(json.dumps(data, indent=2, sort_keys=True) if as_json else tables.render(data))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = _settings(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"anon-ticket: {problem}", file=sys.stderr)
        return EXIT_USAGE
    default, targets = settings.log_levels()
    logs.configure(default, targets, settings.log_format)
    try:
        if args.command == "serve":
            return _serve(settings)
        if args.command == "pid":
            return _pid_new(args.address)
        if args.command == "ctl":
            return _ctl(settings, args)
        if args.command == "db":
            return _db(settings, args)
        if args.command == "dev":
            return run_dev(settings.data_dir, args)
        if args.command in ("redeem", "token", "watch"):
            return run_client(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"anon-ticket: {problem}", file=sys.stderr)
        return EXIT_USAGE
    except InvalidInput as exc:
        print(f"anon-ticket: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (AnonTicketError, OSError) as exc:
        print(f"anon-ticket: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_USAGE


def _serve(settings: Settings) -> int:
    import trio

    from anon_ticket import preflight  # imports the web stack: only `serve` needs it
    from supervisors.tree import run_server

    if settings.dev_chain and settings.monero_rpc_url:
        print("anon-ticket: --dev-chain runs its own wallet; MONERO_RPC_URL is ignored",
              file=sys.stderr)
    elif not settings.monero_rpc_url and not settings.dev_chain:
        print("anon-ticket: serve needs a chain: set MONERO_RPC_URL (a monero-wallet-rpc "
              "URL, e.g. http://127.0.0.1:18083/json_rpc), or run a private regtest chain "
              "with: anon-ticket --dev-chain serve", file=sys.stderr)
        return EXIT_USAGE
    found = preflight.problems(settings)
    if found:
        for problem in found:
            print(f"anon-ticket: {problem}", file=sys.stderr)
        return EXIT_USAGE
    code = trio.run(run_server, settings)
    # The process ends here: the interpreter's closing collections need not walk a heap that
    # is about to go (they took 1 to 2 s after a thousand websocket clients had come and gone).
    # Everything that must outlive the loop was closed inside it; atexit still runs.
    gc.freeze()
    return code


def _pid_new(address: str) -> int:
    from anon_ticket.domain.address import integrated_address
    from anon_ticket.domain.ids import PaymentId

    pid = PaymentId.generate()
    ia = integrated_address(address, pid)
    print(f"Payment ID: {pid.hex()}")
    print(f"Integrated address: {ia}")
    return EXIT_OK


# --- ctl: the internal socket -------------------------------------------------------------


def _client(settings: Settings, socket_path: str | None) -> httpx.Client:
    headers = {}
    if settings.internal_token:
        headers["Authorization"] = f"Bearer {settings.internal_token}"
    if socket_path or settings.internal_socket_path:
        path = socket_path or str(settings.internal_socket_path)
        return httpx.Client(transport=httpx.HTTPTransport(uds=path), base_url="http://internal",
                            headers=headers, timeout=httpx.Timeout(30.0, read=660.0))
    assert settings.internal_bind is not None
    host, port = settings.internal_bind
    return httpx.Client(base_url=f"http://{host}:{port}", headers=headers, timeout=30.0)


def _ctl(settings: Settings, args: argparse.Namespace) -> int:
    cmd = args.ctl_cmd
    routes: dict[str, tuple[str, str, Any]] = {
        "status": ("GET", "/admin/status", None),
        "bloom": ("GET", "/admin/bloom", None),
        "skipped": ("GET", f"/admin/skipped?limit={getattr(args, 'limit', 100)}", None),
        "shutdown": ("POST", "/admin/shutdown", {}),
        "drain": ("POST", "/admin/drain", {}),
    }
    if cmd == "revoke":
        body: dict[str, Any] = {}
        if args.reason is not None:
            body["reason"] = args.reason
        if args.abuse_score is not None:
            body["abuse_score"] = args.abuse_score
        routes["revoke"] = ("POST", f"/api/v1/token/{args.token}/revoke", body)
    elif cmd == "backup":
        routes["backup"] = ("POST", "/admin/backup", {"path": str(Path(args.path).resolve())})
    elif cmd == "poller":
        if args.action == "rescan":
            if args.from_height is None:
                print("anon-ticket: ctl poller rescan needs --from HEIGHT", file=sys.stderr)
                return EXIT_USAGE
            routes["poller"] = ("POST", "/admin/poller/rescan",
                                {"from_height": args.from_height})
        else:
            routes["poller"] = ("POST", f"/admin/poller/{args.action}", {})
    elif cmd == "restart":
        routes["restart"] = ("POST", f"/admin/actors/{args.actor}/restart", {})
    method, path, body = routes[cmd]
    try:
        with _client(settings, args.socket) as client:
            resp = client.request(method, path, json=body)
    except httpx.TransportError as exc:
        print(f"anon-ticket: cannot reach the internal socket: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        data = resp.json()
    except ValueError:
        data = None
    if resp.status_code >= 400:
        text = data.get("error") if isinstance(data, dict) else resp.text
        print(f"anon-ticket: {resp.status_code} {text}", file=sys.stderr)
        if resp.status_code == 404:
            return EXIT_NOT_FOUND
        return EXIT_USAGE if resp.status_code < 500 else EXIT_FAILURE
    _print(data, args.json)
    return EXIT_OK


# --- db -------------------------------------------------------------------------------------


# With PostgreSQL configured, the SQLite-only commands would act on a file no server uses.
_SQLITE_ONLY = {
    "backup": "db backup copies an SQLite database, and the configured database is "
              "PostgreSQL: back it up with pg_dump (e.g. pg_dump --format=custom "
              "--file=PATH DATABASE), and keep the data directory's token.secret with it",
    "restore": "db restore replaces an SQLite database, and the configured database is "
               "PostgreSQL: restore a pg_dump with pg_restore (with no node running on it)",
    "check": "db check reads an SQLite database, and the configured database is PostgreSQL; "
             "it cannot check that one",
}


def _db(settings: Settings, args: argparse.Namespace) -> int:
    from anon_ticket import audit, backup

    datadir = DataDir(settings.data_dir)
    db_path = settings.database_path
    if settings.postgres_url is not None and args.db_cmd in _SQLITE_ONLY:
        print(f"anon-ticket: {_SQLITE_ONLY[args.db_cmd]}", file=sys.stderr)
        return EXIT_USAGE
    if args.db_cmd == "copy":
        return _db_copy(settings, args)
    if args.db_cmd == "backup":
        result = backup.write_backup(db_path, datadir.secret_path, Path(args.path))
        print(f"backup written: {result.path} ({result.bytes} bytes, {result.seconds:.2f} s)")
        return EXIT_OK
    if args.db_cmd == "check":
        problems = audit.check_database(db_path)
        for line in problems:
            print(f"problem: {line}")
        if problems:
            return EXIT_FAILURE
        summary: dict[str, int | None] = dict(audit.summary(db_path))
        if not args.json and summary["cursor"] == -1:
            summary["cursor"] = None  # unset: `-` in the table
        _print(summary, args.json)
        print("ok")
        return EXIT_OK
    # Writers: refuse while a server holds the data directory.
    datadir.ensure()
    try:
        lock = datadir.lock()
    except DataDirLocked as exc:
        print(f"anon-ticket: {exc}; stop it first", file=sys.stderr)
        return EXIT_FAILURE
    try:
        if args.db_cmd == "restore":
            backup.restore_backup(Path(args.path), db_path, datadir.secret_path)
            problems = audit.check_database(db_path)
            print(f"restored {db_path.name} from {args.path}")
            for line in problems:
                print(f"problem: {line}")
            return EXIT_FAILURE if problems else EXIT_OK
        if args.db_cmd == "import-legacy":
            from anon_ticket.legacy import import_legacy

            if settings.postgres_url is not None:
                return _import_legacy_postgres(settings.postgres_url, datadir, args)
            report = import_legacy(Path(args.path), db_path, rescan_from=args.rescan_from)
            for line in report.lines():
                print(line)
            return EXIT_OK
    except StorageError as exc:
        print(f"anon-ticket: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        lock.release()
    return EXIT_USAGE


def _db_copy(settings: Settings, args: argparse.Namespace) -> int:
    from anon_ticket.config import is_postgres_url, parse_postgres_url
    from anon_ticket.dbcopy import copy_to_postgres

    if settings.postgres_url is not None:
        print("anon-ticket: db copy copies the configured SQLite database into PostgreSQL, "
              "and the configured database is already PostgreSQL (DATABASE_URL); between "
              "two PostgreSQL databases use pg_dump and pg_restore", file=sys.stderr)
        return EXIT_USAGE
    if not is_postgres_url(args.to):
        print("anon-ticket: --to must be a postgres:// or postgresql:// URL, like "
              "postgres://user@host/database", file=sys.stderr)
        return EXIT_USAGE
    try:
        url = parse_postgres_url(args.to)
    except ValueError as exc:
        print(f"anon-ticket: --to: {exc}", file=sys.stderr)
        return EXIT_USAGE
    db_path = settings.database_path
    if not db_path.is_file():
        print(f"anon-ticket: {db_path}: no such database file (db copy copies the configured "
              "SQLite database: check --data-dir or DATABASE_URL)", file=sys.stderr)
        return EXIT_USAGE
    report = copy_to_postgres(db_path, url)
    _print(report.summary(short=not args.json), args.json)
    if not args.json:
        print(f"copied and verified; to serve from it, set DATABASE_URL={report.target} and "
              f"give every node this data directory's token.secret")
    return EXIT_OK


def _import_legacy_postgres(url: str, datadir: DataDir, args: argparse.Namespace) -> int:
    """Into PostgreSQL: import into a new SQLite file in the data directory (the import as it
    is for SQLite), then `db copy` that into the (empty) database, verified."""
    import tempfile

    from anon_ticket.dbcopy import check_target, copy_to_postgres
    from anon_ticket.legacy import import_legacy

    check_target(url)
    with tempfile.TemporaryDirectory(prefix=".import-legacy-", dir=datadir.path) as tmp:
        staged = Path(tmp) / "anon-ticket.db"
        report = import_legacy(Path(args.path), staged, rescan_from=args.rescan_from)
        copied = copy_to_postgres(staged, url)
    for line in report.lines():
        print(line)
    print()
    summary = copied.summary(short=True)
    summary["source"] = str(Path(args.path).resolve())  # (the staging file is gone)
    _print(summary, False)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
