"""The structured logs: docs/logs.md lists every event the code logs, with its fields (read
from the code with ast, so the document cannot drift), and what a log line may never hold
(docs/architecture.md, I10): a whole payment id, token or txid, or a client's address.

`leaks` is the scan that tests/e2e/test_chain_logs.py runs over every line of a real server's
JSON log; the tests here show it finds what it looks for.
"""

from __future__ import annotations

import ast
import io
import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from anon_ticket import logs
from anon_ticket.domain.ids import PaymentId, ServiceToken
from anon_ticket.web import new_app

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "logs.md"
PACKAGES = ("anon_ticket", "actors", "supervisors", "mailboxes")
LEVELS = frozenset({"debug", "info", "warning", "error", "exception", "critical"})
CORE = ("ts", "level", "actor", "event")  # on every line, before an event's own fields


# --- the code's log calls -------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    where: str
    actor: str | None  # get_logger's name; None for a stdlib logger (the actor is a field)
    levels: frozenset[str]
    event: str | None  # None: not a string literal
    fields: frozenset[str]


def _loggers(tree: ast.Module) -> dict[str, str | None]:
    """Module-level names bound to `get_logger("x")` (→ "x") or `logging.getLogger(...)`."""
    found: dict[str, str | None] = {}
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)):
            continue
        func = ast.unparse(node.value.func)
        if func not in ("get_logger", "logging.getLogger"):
            continue
        arg = node.value.args[0] if node.value.args else None
        name = arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else None
        for target in node.targets:
            if isinstance(target, ast.Name):
                found[target.id] = name if func == "get_logger" else None
    return found


def _fields(call: ast.Call) -> set[str]:
    names = {k.arg for k in call.keywords if k.arg is not None and k.arg != "extra"}
    for k in call.keywords:  # a stdlib logger: extra={"actor": ..., "fields": {...}}
        if k.arg == "extra" and isinstance(k.value, ast.Dict):
            for key, value in zip(k.value.keys, k.value.values, strict=True):
                if isinstance(key, ast.Constant) and key.value == "fields":
                    assert isinstance(value, ast.Dict)
                    names.update(str(ast.literal_eval(f)) for f in value.keys if f is not None)
    return names


def log_calls() -> Iterator[Call]:
    """Every `log.info(...)` (any level) in the project's packages, including the
    `(log.warning if ... else log.error)(...)` form."""
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            loggers = _loggers(tree)
            for node in ast.walk(tree):
                if not isinstance(node, ast.Call):
                    continue
                funcs = ([node.func.body, node.func.orelse] if isinstance(node.func, ast.IfExp)
                         else [node.func])
                if not all(isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name)
                           and f.value.id in loggers and f.attr in LEVELS for f in funcs):
                    continue
                owner = funcs[0].value.id  # type: ignore[attr-defined]
                first = node.args[0] if node.args else None
                event = (first.value if isinstance(first, ast.Constant)
                         and isinstance(first.value, str) else None)
                yield Call(f"{path.relative_to(ROOT)}:{node.lineno}", loggers[owner],
                           frozenset(f.attr for f in funcs), event,  # type: ignore[attr-defined]
                           frozenset(_fields(node)))


# --- docs/logs.md -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Documented:
    actors: frozenset[str]
    levels: frozenset[str]
    fields: frozenset[str]


def documented() -> dict[str, Documented]:
    """The rows of the tables under "## Events": | `event` | actor | level | fields | meaning |."""
    out: dict[str, Documented] = {}
    text = DOC.read_text()
    events = text[text.index("\n## Events\n"):]
    events = events[:events.find("\n## ", 1)]
    for line in events.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        event = cells[0].strip("`")
        assert event not in out, f"docs/logs.md lists {event!r} twice"
        ticks = re.compile(r"`([^`]+)`")
        out[event] = Documented(frozenset(ticks.findall(cells[1])),
                                frozenset(ticks.findall(cells[2]) or cells[2].split(", ")),
                                frozenset(ticks.findall(cells[3])))
    return out


def test_every_event_in_the_code_is_documented_with_its_fields() -> None:
    calls = list(log_calls())
    assert len(calls) > 60  # the reader found them
    dynamic = [c.where for c in calls if c.event is None]
    assert not dynamic, f"an event name must be a string literal: {dynamic}"
    doc = documented()
    in_code = {c.event for c in calls}
    assert in_code - set(doc) == set(), "logged but not in docs/logs.md"
    assert set(doc) - in_code == set(), "in docs/logs.md but logged nowhere"
    for event, entry in doc.items():
        mine = [c for c in calls if c.event == event]
        fields = frozenset().union(*(c.fields for c in mine))
        assert entry.fields == fields, (event, [c.where for c in mine])
        levels = frozenset().union(*(c.levels for c in mine))
        assert entry.levels == levels, (event, [c.where for c in mine])
        actors = {c.actor for c in mine if c.actor is not None}
        assert actors <= entry.actors, (event, [c.where for c in mine])


def test_no_event_has_a_field_named_like_a_lines_own() -> None:
    # A field `actor` would overwrite the line's own actor in JSON (and repeat it in text).
    clashes = [(c.where, sorted(c.fields & set(CORE))) for c in log_calls()
               if c.fields & set(CORE)]
    assert not clashes


# --- the scan ---------------------------------------------------------------------------------

_HEX_RUN = re.compile(r"(?<![0-9A-Za-z])[0-9A-Fa-f]{16,}(?![0-9A-Za-z])")


def leaks(line: str, secrets: Iterable[str] = (), client_ip: str | None = None,
          client_ports: Iterable[int] = ()) -> list[str]:
    """What one log line must not hold (I10): any of `secrets` (payment ids, tokens, txids;
    in any case), any whole run of 16 or more hex digits (a payment id, a token or a txid the
    test does not know of), the client's address, or one of its ports in an address or in a
    string field. `line` is one JSON log line; [] when it is clean."""
    found: list[str] = []
    lowered = line.lower()
    found += [f"secret {s[:6]}…" for s in secrets if s.lower() in lowered]
    found += [f"{len(m.group())} hex digits" for m in _HEX_RUN.finditer(line)
              if not m.group().isdigit()]
    if client_ip is not None and client_ip in line:
        found.append(f"client address {client_ip}")
    record = json.loads(line)
    for port in client_ports:
        text = re.compile(rf"(?<![\d.]){port}(?![\d.])")
        for key, value in record.items():
            if (isinstance(value, str) and text.search(value)) or (
                    "port" in key and value == port):
                found.append(f"client port {port} in {key}")
    return found


def test_the_scan_finds_what_it_looks_for() -> None:
    pid, token = PaymentId.generate(), ServiceToken(bytes(range(32)))
    txid = "ab" * 32

    def line(**fields: object) -> str:
        return json.dumps({"ts": "2026-01-01T00:00:00Z", "level": "info", "actor": "storage",
                           "event": "token topped up", **fields})

    clean = line(pid=pid.redacted(), token=token.redacted(), txid=txid[:6] + "…",
                 amount=10**12, address="http://127.0.0.1:8080")
    assert leaks(clean, [pid.hex(), token.hex(), txid], "127.0.0.42", [41234]) == []
    assert leaks(line(pid=pid.hex()), [pid.hex()]) == [f"secret {pid.hex()[:6]}…",
                                                       "16 hex digits"]
    assert leaks(line(pid=pid.hex().upper()), [pid.hex()])[0].startswith("secret")
    assert leaks(line(other=PaymentId.generate().hex())) == ["16 hex digits"]
    assert leaks(line(token=token.hex())) == ["64 hex digits"]
    assert leaks(line(error=f"Exception on request GET /api/v1/token/{txid}")) == [
        "64 hex digits"]
    assert leaks(line(peer="('127.0.0.42', 51234)"), client_ip="127.0.0.42") == [
        "client address 127.0.0.42"]
    assert leaks(line(peer="client 51234 went away"), client_ports=[51234]) == [
        "client port 51234 in peer"]
    assert leaks(line(peer_port=51234), client_ports=[51234]) == ["client port 51234 in "
                                                                  "peer_port"]
    assert leaks(line(amount=10**12, seconds=0.51234, bytes=51234), client_ports=[51234]) == []


# --- the formatters -------------------------------------------------------------------------


def _emit(fmt: str, level: str = "info") -> list[str]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.JsonFormatter() if fmt == "json" else logs.KeyValueFormatter())
    logger = logging.getLogger(f"{logs.ROOT}.unittest")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        getattr(logs.get_logger("unittest"), level)("token topped up", pid="01ab…", amount=5,
                                                    in_pool=True, path=Path("/x y"))
    finally:
        logger.removeHandler(handler)
    return out.getvalue().splitlines()


def test_json_lines_carry_the_documented_keys_first() -> None:
    (line,) = _emit("json")
    record = json.loads(line)
    assert list(record)[:4] == list(CORE)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", record["ts"])
    assert record | {"ts": ""} == {"ts": "", "level": "info", "actor": "unittest",
                                   "event": "token topped up", "pid": "01ab…", "amount": 5,
                                   "in_pool": True, "path": "/x y"}


def test_text_lines_quote_what_has_spaces() -> None:
    (line,) = _emit("text", "warning")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z warning actor=unittest "
                        r'"token topped up" pid=01ab… amount=5 in_pool=True path="/x y"', line)


# --- the web stack's own logging ------------------------------------------------------------


class Boom(Exception):
    pass


async def test_an_error_past_the_handlers_is_logged_without_the_path(
        caplog: pytest.LogCaptureFixture) -> None:
    """quart logs "Exception on request GET <path>" with a traceback when an exception gets
    past the error handlers, and token paths are in URLs: ours logs the type only."""
    app = new_app("anon_ticket.unittest", max_body_bytes=4096)
    token = "cd" * 32

    @app.get("/api/v1/token/<token>")
    async def show(token: str) -> str:
        raise Boom()

    @app.errorhandler(Boom)
    async def broken(exc: Boom) -> str:
        raise RuntimeError(f"while handling {token}")

    caplog.set_level(logging.DEBUG)
    response = await app.test_client().get(f"/api/v1/token/{token}")
    assert response.status_code == 500
    assert json.loads(await response.get_data()) == {"error": "internal error"}
    records = [r for r in caplog.records if r.name.startswith(logs.ROOT)]
    assert [(r.getMessage(), getattr(r, "fields", None)) for r in records] == [
        ("unhandled error", {"error": "RuntimeError"})]
    assert all(r.exc_info is None for r in records)
    assert token not in caplog.text
