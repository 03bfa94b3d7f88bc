"""Settings (README "Settings"): CLI flag > environment > TOML file > default.

Naming: field `x_y` ↔ flag `--x-y` ↔ env `ANON_TICKET_X_Y` ↔ TOML key `x_y`; the original's
environment names (`DATABASE_URL`, `API_BIND_ADDRESS`, `MONITOR_MIN_CONFIRMATIONS`, ...) are
accepted too, and ours win when both are set. Every value is validated at load; all problems are
collected and raised together as one `ConfigError`, one line each, naming where the bad value came
from. Secrets are never echoed.
"""

from __future__ import annotations

import argparse
import difflib
import ipaddress
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from anon_ticket.datadir import DB_FILE_NAME, INTERNAL_SOCKET_NAME
from anon_ticket.errors import ConfigError

ENV_PREFIX = "ANON_TICKET_"
CONFIG_ENV = "ANON_TICKET_CONFIG"
# sun_path is 108 bytes on Linux, one of them the terminating NUL.
UNIX_SOCKET_PATH_MAX = 107
SECRET_FIELDS = frozenset({"internal_token", "monero_rpc_login"})
INTERNAL_TOKEN_MIN_LEN = 16

LogFormat = Literal["text", "json"]
TokenDerivation = Literal["hmac", "legacy"]
WorkerReads = Literal["local", "owner"]

T = TypeVar("T")


class _Bad(ValueError):
    """A value failed validation; the message says why, without the source."""


# --- pure parsers (also usable on their own; they raise ValueError) ---------------------------

_HOSTNAME_RE = re.compile(
    r"^[A-Za-z0-9]([A-Za-z0-9_-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9_-]*[A-Za-z0-9])?)*$"
)


def parse_host_port(text: str) -> tuple[str, int]:
    """`host:port` or `[ipv6]:port` → (host, port); port 0..65535."""
    s = text.strip()
    reason: str | None = None
    host = port_text = ""
    if s.startswith("["):
        end = s.find("]")
        if end < 0 or not s[end + 1 :].startswith(":"):
            reason = "an IPv6 address is written [addr]:port"
        else:
            host, port_text = s[1:end], s[end + 2 :]
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                reason = f"{host!r} is not an IPv6 address"
    else:
        host, sep, port_text = s.rpartition(":")
        if not sep:
            reason = "missing :port"
        elif ":" in host:
            reason = "an IPv6 address must be in brackets, like [::1]:8080"
        elif not host:
            reason = "missing host"
        elif not _HOSTNAME_RE.match(host):
            reason = f"{host!r} is not a host name or IP address"
    if reason is None and not (port_text.isdigit() and 0 <= int(port_text) <= 65535):
        reason = "the port must be a number from 0 to 65535"
    if reason is not None:
        raise _Bad(f"must be host:port like 127.0.0.1:8080 or [::1]:8080 ({reason}), got {s!r}")
    return host, int(port_text)


def is_loopback_host(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


POSTGRES_SCHEMES = ("postgres", "postgresql")


def is_postgres_url(url: str | None) -> bool:
    return url is not None and url.strip().partition("://")[0].lower() in POSTGRES_SCHEMES


def parse_postgres_url(url: str) -> str:
    """A `postgres://` or `postgresql://` URL, as libpq reads it (host, port, user, password,
    database and its `?key=value` options, `host=/dir` for a unix socket)."""
    from psycopg import conninfo  # (loaded only for an operator who chose PostgreSQL)

    text = url.strip()
    try:
        conninfo.conninfo_to_dict(text)
    except Exception as exc:  # psycopg.ProgrammingError: libpq could not parse it
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "unreadable"
        raise _Bad(f"not a valid PostgreSQL URL ({reason[:120]})") from None
    return text


def redact_url(url: str) -> str:
    """The URL without its password (for logs and `describe`)."""
    return re.sub(r"(://[^:/@?#]*:)[^@/?#]*@", r"\1***@", url)


def parse_database_url(url: str, cwd: Path) -> Path:
    """`sqlite:///abs/path` or `sqlite://rel/path` (relative to `cwd`), optional `?mode=rwc`."""
    text = url.strip()
    memory = _Bad("an in-memory database is refused: anon-ticket needs a database file")
    if ":memory:" in text:
        raise memory
    scheme, sep, rest = text.partition("://")
    if not sep or scheme.lower() != "sqlite":
        what = (
            f"a {scheme}:// URL"
            if sep and re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme)
            else (repr(text) if "@" not in text else "a URL with credentials")
        )
        raise _Bad(
            "only sqlite:// and postgres:// URLs are supported (sqlite:///absolute/path, "
            f"sqlite://relative/path or postgres://user@host/database), got {what}"
        )
    path_text, qsep, query = rest.partition("?")
    if qsep:
        for key, value in parse_qsl(query, keep_blank_values=True):
            if key == "mode" and value == "memory":
                raise memory
            if (key, value) != ("mode", "rwc"):
                raise _Bad(f"unsupported query {key}={value} (only ?mode=rwc is accepted)")
    if not path_text:
        raise _Bad(
            "the URL names no database file (sqlite:///absolute/path or sqlite://relative/path)"
        )
    path = Path(path_text)
    return Path(os.path.normpath(path if path.is_absolute() else cwd / path))


_PY_LEVELS = MappingProxyType(
    {
        "trace": "DEBUG",
        "debug": "DEBUG",
        "info": "INFO",
        "warn": "WARNING",
        "warning": "WARNING",
        "error": "ERROR",
        # Python has no "off"; CRITICAL is the closest (nothing here logs at CRITICAL).
        "off": "CRITICAL",
    }
)
# The original's crates and their Python counterparts.
_TARGET_ALIASES = MappingProxyType(
    {
        "anon_ticket": ("anon_ticket", "actors", "supervisors"),
        "anon_ticket_api": ("actors.public", "actors.internal"),
        "anon_ticket_monitor": ("actors.poller",),
        "anon_ticket_storage": ("actors.storage",),
        "anon_ticket_domain": ("anon_ticket.domain",),
    }
)
_TARGET_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*((::|\.)[A-Za-z_][A-Za-z0-9_]*)*$")
# With only per-target items, env_logger turns everything else off; we keep warnings.
_DEFAULT_PY_LEVEL = "WARNING"


def _logger_names(target: str) -> tuple[str, ...]:
    if not _TARGET_RE.match(target):
        raise _Bad(f"{target!r} is not a valid target (like anon_ticket or hypercorn.error)")
    return _TARGET_ALIASES.get(target, (target.replace("::", "."),))


def parse_log_filter(text: str) -> tuple[str, dict[str, str]]:
    """An env_logger-like filter (`info,anon_ticket=debug`) → (default level, {logger: level})."""
    default: str | None = None
    targets: dict[str, str] = {}
    items = [item.strip() for item in text.split(",")]
    if not any(items):
        raise _Bad("must not be empty (like info or warn,anon_ticket=debug)")
    for item in items:
        if not item:
            continue
        if "/" in item:
            raise _Bad(f"regex filters are not supported, got {item!r}")
        target, sep, level_text = item.partition("=")
        if sep:
            level = level_text.strip().lower()
            if level not in _PY_LEVELS:
                raise _Bad(
                    f"unknown level {level_text.strip()!r} in {item!r} "
                    "(use trace, debug, info, warn, error or off)"
                )
            for name in _logger_names(target.strip()):
                targets[name] = _PY_LEVELS[level]
        elif item.lower() in _PY_LEVELS:
            default = _PY_LEVELS[item.lower()]
        else:
            # env_logger: a bare target means everything from it.
            for name in _logger_names(item):
                targets[name] = "DEBUG"
    return default or _DEFAULT_PY_LEVEL, targets


def normalize_monero_rpc_url(text: str) -> str:
    """An http(s) URL with a host; the result ends with `/json_rpc`."""
    s = text.strip()
    try:
        parts = urlsplit(s)
        port_ok = True
        try:
            _ = parts.port
        except ValueError:
            port_ok = False
    except ValueError as exc:
        raise _Bad("is not a valid URL") from exc
    if "@" in parts.netloc:
        raise _Bad(
            "must not contain credentials (value not shown); "
            "use --monero-rpc-login / ANON_TICKET_MONERO_RPC_LOGIN"
        )
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise _Bad(f"must be an http:// or https:// URL like http://127.0.0.1:18082, got {s!r}")
    if not parts.hostname:
        raise _Bad(f"must name a host, got {s!r}")
    if not port_ok:
        raise _Bad(f"has an invalid port, got {s!r}")
    if parts.query or parts.fragment:
        raise _Bad(f"must not have a query or fragment, got {s!r}")
    path = parts.path.rstrip("/")
    if not path.endswith("/json_rpc"):
        path += "/json_rpc"
    return urlunsplit((scheme, parts.netloc, path, "", ""))


# --- Settings -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Every setting, validated. Build it with `load_settings`; defaults here are the defaults."""

    data_dir: Path = Path("data")
    database_url: str | None = None
    bind_address: str = "127.0.0.1:8080"
    unix_socket: Path | None = None
    internal_unix_socket: Path | None = None
    internal_bind_address: str | None = None
    internal_token: str | None = field(default=None, repr=False)
    log_filter: str = "info"
    log_format: LogFormat = "text"
    monero_rpc_url: str | None = None
    monero_rpc_login: str | None = field(default=None, repr=False)
    primary_address: str | None = None
    dev_chain: bool = False
    start_height: int | None = None
    min_confirmations: int = 10
    min_payment_amount: int = 10_000_000_000
    poll_interval_secs: float = 5.0
    scan_window_blocks: int = 1000
    watch_send_timeout_secs: float = 10.0
    rpc_timeout_secs: float | None = None
    pid_bloom_entries: int = 1_000_000
    pid_bloom_fp_rate: float = 1e-6
    allow_no_bloom: bool = False
    pid_cache_ttl_secs: float = 60.0
    pid_cache_capacity: int = 100_000
    token_derivation: TokenDerivation = "hmac"
    max_body_bytes: int = 4096
    max_connections: int = 10_000
    keep_alive_secs: float = 30.0
    read_timeout_secs: float = 10.0
    write_timeout_secs: float = 10.0
    unknown_rate_per_sec: float = 200.0
    request_timeout_secs: float = 5.0
    batch_limit: int = 256
    workers: int = 0
    worker_reads: WorkerReads = "local"
    node_name: str | None = None
    grace_secs: float = 10.0
    restart_intensity: int = 5
    restart_period_secs: float = 30.0
    backoff_initial_secs: float = 0.1
    backoff_max_secs: float = 5.0

    @property
    def postgres_url(self) -> str | None:
        """The PostgreSQL URL when the database is PostgreSQL (several nodes may share it);
        None for the embedded SQLite file."""
        return self.database_url if is_postgres_url(self.database_url) else None

    @property
    def database_path(self) -> Path:
        """The SQLite file (with PostgreSQL: none is used; this names where it would be)."""
        if self.database_url is None or self.postgres_url is not None:
            return self.data_dir / DB_FILE_NAME
        return parse_database_url(self.database_url, Path.cwd())

    @property
    def bind_host(self) -> str:
        return parse_host_port(self.bind_address)[0]

    @property
    def bind_port(self) -> int:
        return parse_host_port(self.bind_address)[1]

    @property
    def internal_socket_path(self) -> Path | None:
        """The internal unix socket, or None when the internal listener is TCP."""
        if self.internal_unix_socket is not None:
            return self.internal_unix_socket
        if self.internal_bind_address is not None:
            return None
        return self.data_dir / INTERNAL_SOCKET_NAME

    @property
    def internal_bind(self) -> tuple[str, int] | None:
        """(host, port) of the internal TCP listener; None when it is a unix socket.

        As in the original, an internal unix socket wins over an internal bind address.
        """
        if self.internal_unix_socket is not None or self.internal_bind_address is None:
            return None
        return parse_host_port(self.internal_bind_address)

    @property
    def internal_tcp_warning(self) -> str | None:
        """A start-up warning about the internal listener, if it deserves one."""
        if self.internal_bind_address is None:
            return None
        if self.internal_unix_socket is not None:
            return (
                f"internal bind address {self.internal_bind_address} is ignored: the internal "
                f"unix socket {self.internal_unix_socket} takes precedence"
            )
        if self.internal_token is None:
            return (
                f"the internal API listens on TCP {self.internal_bind_address} without a token: "
                "any local user can revoke tokens and command the server; prefer the unix "
                "socket or set ANON_TICKET_INTERNAL_TOKEN"
            )
        return None

    def log_levels(self) -> tuple[str, dict[str, str]]:
        """(root Python level name, {logger name: level name}) from `log_filter`."""
        return parse_log_filter(self.log_filter)

    def describe(self) -> dict[str, object]:
        """The effective settings for a start-up log line, secrets replaced by "***"."""
        out: dict[str, object] = {}
        for f in fields(self):
            value: object = getattr(self, f.name)
            if f.name in SECRET_FIELDS and value is not None:
                value = "***"
            elif isinstance(value, Path):
                value = str(value)
            out[f.name] = value
        if self.postgres_url is not None:
            out["database_url"] = redact_url(self.postgres_url)
        else:
            out["database_path"] = str(self.database_path)
        socket = self.internal_socket_path
        out["internal_socket_path"] = None if socket is None else str(socket)
        return out




# --- value parsers: object (str from CLI/env, native from TOML) → typed value -----------------


def _text(value: object) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise _Bad(f"must be a string, got {value!r}")
    s = value.strip()
    if not s:
        raise _Bad("must not be empty")
    return s


def _node_name(value: object) -> str:
    s = _text(value)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", s):
        raise _Bad("must be 1 to 63 letters, digits, '.', '_' or '-' (starting with a letter "
                   f"or digit), got {value!r}")
    return s


def _choice(*options: str) -> Callable[[object], Any]:
    """One of `options` (case-insensitive), as written there."""
    def parse(value: object) -> str:
        s = _text(value).lower()
        if s in options:
            return s
        raise _Bad(f"must be {' or '.join(options)}, got {value!r}")
    return parse


_log_format = _choice("text", "json")
_token_derivation = _choice("hmac", "legacy")
_worker_reads = _choice("local", "owner")


def _path(value: object) -> Path:
    s = _text(value)
    if "\0" in s:
        raise _Bad("must not contain a NUL character")
    return Path(os.path.abspath(os.path.expanduser(s)))


def _int(lo: int, hi: int | None = None) -> Callable[[object], int]:
    want = f"an integer >= {lo}" if hi is None else f"an integer from {lo} to {hi}"

    def parse(value: object) -> int:
        number: int | None = None
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, str):
            try:
                number = int(value.strip())
            except ValueError:
                number = None
        if number is None or number < lo or (hi is not None and number > hi):
            raise _Bad(f"must be {want}, got {value!r}")
        return number

    return parse


def _float(lo: float, *, lo_open: bool, hi: float | None = None) -> Callable[[object], float]:
    want = f"a number {'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        want += f" and < {hi:g}"

    def parse(value: object) -> float:
        number: float | None = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                number = None
        if (
            number is None
            or not math.isfinite(number)
            or number < lo
            or (lo_open and number == lo)
            or (hi is not None and number >= hi)
        ):
            raise _Bad(f"must be {want}, got {value!r}")
        return number

    return parse


_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        s = value.strip().lower()
        if s in _TRUE:
            return True
        if s in _FALSE:
            return False
    raise _Bad(f"must be true or false (or 1/0, yes/no, on/off), got {value!r}")








def _host_port(value: object) -> str:
    s = _text(value)
    parse_host_port(s)
    return s


def _database_url(value: object) -> str:
    text = _text(value)
    if is_postgres_url(text):
        return parse_postgres_url(text)
    path = parse_database_url(text, Path.cwd())
    return f"sqlite://{path}"


def _log_filter(value: object) -> str:
    if not isinstance(value, str):
        raise _Bad(f"must be a string, got {value!r}")
    parse_log_filter(value)
    return value.strip()


def _monero_rpc_url(value: object) -> str:
    return normalize_monero_rpc_url(_text(value))


def _secret_text(value: object) -> str:
    # Never include the value: not even its type's repr could be safe.
    if not isinstance(value, str):
        raise _Bad("must be a string (value not shown)")
    s = value.strip()
    if not s:
        raise _Bad("must not be empty")
    return s


def _internal_token(value: object) -> str:
    s = _secret_text(value)
    if len(s) < INTERNAL_TOKEN_MIN_LEN:
        raise _Bad(
            f"must be at least {INTERNAL_TOKEN_MIN_LEN} characters, got {len(s)} (value not shown)"
        )
    if any(not 0x21 <= ord(c) <= 0x7E for c in s):
        raise _Bad("must be printable ASCII without spaces (value not shown)")
    return s


def _rpc_login(value: object) -> str:
    s = _secret_text(value)
    user, sep, password = s.partition(":")
    if not sep or not user or not password:
        raise _Bad("must be user:password (value not shown)")
    return s


# --- what each setting is called where ---------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    name: str
    help: str
    original_env: tuple[str, ...] = ()
    default_text: str | None = None
    boolean: bool = False
    # str from the CLI or the environment, native from TOML -> the typed value, or _Bad
    parse: Callable[[object], Any] = field(kw_only=True)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def env_names(self) -> tuple[str, ...]:
        return (self.env, *(e for e in self.original_env if e != self.env))


_SPECS: tuple[_Spec, ...] = (
    _Spec("data_dir",
          "data directory: database, token secret, sockets, lock",
          (), "./data", parse=_path),
    _Spec("database_url",
          "sqlite:///abs/path or sqlite://rel/path (optional ?mode=rwc), or "
          "postgres://user:password@host/db (several nodes may share it)",
          ("DATABASE_URL",), "<data-dir>/anon-ticket.db", parse=_database_url),
    _Spec("bind_address",
          "public listener host:port",
          ("API_BIND_ADDRESS",), parse=_host_port),
    _Spec("unix_socket",
          "public listener on this unix socket instead of TCP",
          ("API_UNIX_SOCKET",), parse=_path),
    _Spec("internal_unix_socket",
          "internal API unix socket",
          ("API_INTERNAL_UNIX_SOCKET",), "<data-dir>/internal.sock", parse=_path),
    _Spec("internal_bind_address",
          "internal API on TCP host:port instead (non-loopback needs --internal-token)",
          ("API_INTERNAL_BIND_ADDRESS",), parse=_host_port),
    _Spec("internal_token",
          "bearer token for the internal API (secret, >= 16 chars; prefer env)",
          parse=_internal_token),
    _Spec("log_filter",
          "log filter like info or warn,anon_ticket=debug",
          ("API_LOG_FILTER",), parse=_log_filter),
    _Spec("log_format",
          "log format: text or json",
          parse=_log_format),
    _Spec("monero_rpc_url",
          "monero-wallet-rpc URL, like http://127.0.0.1:18082",
          ("MONERO_RPC_URL",), parse=_monero_rpc_url),
    _Spec("monero_rpc_login",
          "wallet-rpc --rpc-login user:password (secret; prefer env)",
          parse=_rpc_login),
    _Spec("primary_address",
          "expected primary address of the wallet",
          parse=_text),
    _Spec("dev_chain",
          "run a private regtest chain (monerod + wallet-rpc)",
          boolean=True, parse=_bool),
    _Spec("start_height",
          "first height to scan on a fresh database",
          ("MONITOR_START_HEIGHT",), parse=_int(0)),
    _Spec("min_confirmations",
          "confirmations before a payment is claimable (1..1000)",
          ("MONITOR_MIN_CONFIRMATIONS",), parse=_int(1, 1000)),
    _Spec("min_payment_amount",
          "smallest transfer credited, in piconero",
          ("MONITOR_MIN_PAYMENT_AMOUNT",), parse=_int(1, 2**62)),
    _Spec("poll_interval_secs",
          "wallet poll interval in seconds",
          ("MONITOR_POLL_INTERVAL_SECS",), parse=_float(0, lo_open=True)),
    _Spec("scan_window_blocks",
          "heights per get_transfers crediting window (1..100000)",
          parse=_int(1, 100_000)),
    _Spec("watch_send_timeout_secs",
          "a websocket watcher that cannot take a message this long is closed (4008)",
          parse=_float(0, lo_open=True)),
    _Spec("rpc_timeout_secs",
          "cap on every wallet-rpc call's timeout (default: refresh 300 s, get_transfers "
          "60 s, get_height 10 s)",
          default_text="per method", parse=_float(0, lo_open=True)),
    _Spec("pid_bloom_entries",
          "Bloom filter capacity (0 = no filter, needs --allow-no-bloom)",
          ("API_PID_BLOOM_ENTRIES",), parse=_int(0)),
    _Spec("pid_bloom_fp_rate",
          "Bloom filter false-positive rate",
          ("API_PID_BLOOM_FP_RATE",), parse=_float(0, lo_open=True, hi=1)),
    _Spec("allow_no_bloom",
          "allow running without a Bloom filter",
          ("API_ALLOW_NO_BLOOM",), boolean=True, parse=_bool),
    _Spec("pid_cache_ttl_secs",
          "claimed-PID cache TTL in seconds (0 = off)",
          ("API_PID_CACHE_TTL_SECS",), parse=_float(0, lo_open=False)),
    _Spec("pid_cache_capacity",
          "claimed-PID cache capacity",
          ("API_PID_CACHE_CAPACITY",), parse=_int(0)),
    _Spec("token_derivation",
          "token derivation for new claims: hmac or legacy",
          parse=_token_derivation),
    _Spec("max_body_bytes",
          "largest request body in bytes (256..1048576)",
          parse=_int(256, 1_048_576)),
    _Spec("max_connections",
          "public connections at once (16..1000000; lowered to fit the descriptor limit; with "
          "workers, per worker process): the oldest idle one makes room, else a new one gets "
          "503",
          parse=_int(16, 1_000_000)),
    _Spec("keep_alive_secs",
          "an idle public connection is closed after this long",
          parse=_float(0, lo_open=True, hi=3600)),
    _Spec("read_timeout_secs",
          "a request's head, then its body, must arrive within this",
          parse=_float(0, lo_open=True, hi=600)),
    _Spec("write_timeout_secs",
          "a response the client does not take within this ends its connection",
          parse=_float(0, lo_open=True, hi=600)),
    _Spec("unknown_rate_per_sec",
          "answers about unknown ids (404 redeem/token) and websocket subscribes past this rate "
          "are held back up to 5 s (0 = never); with workers, per worker process",
          parse=_float(0, lo_open=False)),
    _Spec("request_timeout_secs",
          "deadline of every internal request in seconds",
          parse=_float(0, lo_open=True)),
    _Spec("batch_limit",
          "storage group-commit batch size (1..10000)",
          parse=_int(1, 10_000)),
    _Spec("workers",
          "public-listener worker processes in front of the one storage owner (0: one per "
          "core; 1: a single process, no workers; up to 64)",
          parse=_int(0, 64)),
    _Spec("worker_reads",
          "with workers: local (a worker reads claimed tickets and tokens from the database "
          "itself, read-only) or owner (it asks the owner for them)",
          parse=_worker_reads),
    _Spec("node_name",
          "this node's name among several sharing a PostgreSQL database (logs, the "
          "cluster_nodes table); default: host name and a random suffix",
          default_text="<host>-<random>", parse=_node_name),
    _Spec("grace_secs",
          "shutdown grace in seconds",
          parse=_float(0, lo_open=False)),
    _Spec("restart_intensity",
          "restarts allowed within restart_period_secs before escalating",
          parse=_int(1)),
    _Spec("restart_period_secs",
          "window of restart_intensity, in seconds",
          parse=_float(0, lo_open=True)),
    _Spec("backoff_initial_secs",
          "first restart backoff in seconds",
          parse=_float(0, lo_open=True)),
    _Spec("backoff_max_secs",
          "largest restart backoff in seconds",
          parse=_float(0, lo_open=True)),
)
_SPEC_BY_NAME: Mapping[str, _Spec] = MappingProxyType({s.name: s for s in _SPECS})


def settings_to_json(settings: Settings) -> str:
    """The settings as a worker process gets them from its owner (exactly, secrets too:
    through its environment, never its command line)."""
    return json.dumps({f.name: (str(v) if isinstance(v := getattr(settings, f.name), Path)
                                else v) for f in fields(Settings)})


def settings_from_json(text: str) -> Settings:
    data = json.loads(text)
    values: dict[str, Any] = {}
    for f in fields(Settings):
        value = data[f.name]
        if value is not None and "Path" in str(f.type):
            value = Path(value)
        values[f.name] = value
    return Settings(**values)


def settings_table() -> str:
    """The README's settings table, made from the one table above (a test holds the README
    to it)."""
    defaults = Settings()
    rows = ["| flag (env `ANON_TICKET_…`, TOML key) | original's env | default | meaning |",
            "|---|---|---|---|"]
    for spec in _SPECS:
        value = getattr(defaults, spec.name)
        default = spec.default_text or ("—" if value is None else
                                        str(value).lower() if spec.boolean else str(value))
        original = ", ".join(f"`{e}`" for e in spec.original_env)
        rows.append(f"| `{spec.flag}` | {original} | `{default}` | {spec.help} |")
    return "\n".join(rows) + "\n"


# --- loading ------------------------------------------------------------------------------------


class _Sources:
    """Finds each setting in the first source that gives it, and collects problems."""

    def __init__(
        self,
        cli: Mapping[str, object],
        env: Mapping[str, str],
        toml: Mapping[str, object],
        toml_label: str,
    ) -> None:
        self._cli = cli
        self._env = env
        self._toml = toml
        self._toml_label = toml_label
        self.problems: list[str] = []
        self.labels: dict[str, str] = {}
        self.failed: set[str] = set()

    def _find(self, name: str) -> tuple[str, object] | None:
        spec = _SPEC_BY_NAME[name]
        value = self._cli.get(name)
        if value is not None:
            return spec.flag, value
        for env_name in spec.env_names:
            raw = self._env.get(env_name)
            if raw is not None and raw.strip():
                return env_name, raw
        if name in self._toml:
            return f"{self._toml_label}: {name}", self._toml[name]
        return None

    def take(self, name: str, parse: Callable[[object], T], default: T) -> T:
        found = self._find(name)
        if found is None:
            return default
        label, value = found
        self.labels[name] = label
        try:
            return parse(value)
        except _Bad as exc:
            self.problems.append(f"{label}: {exc}")
            self.failed.add(name)
            return default

    def given(self, name: str) -> bool:
        return name in self.labels

    def label(self, name: str) -> str:
        spec = _SPEC_BY_NAME[name]
        return self.labels.get(name, f"{name} (default {spec.default_text or 'unset'})")


def _read_toml(path: Path, problems: list[str]) -> dict[str, object]:
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        problems.append(f"{path}: cannot read config file: {exc.strerror or exc}")
        return {}
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        problems.append(f"{path}: invalid TOML: {exc}")
        return {}
    known: dict[str, object] = {}
    for key, value in data.items():
        if key in _SPEC_BY_NAME:
            known[key] = value
            continue
        close = difflib.get_close_matches(key, list(_SPEC_BY_NAME), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        problems.append(f"{path}: unknown key {key!r}{hint}")
    return known


def _socket_too_long(path: Path) -> int | None:
    size = len(os.fsencode(path))
    return size if size > UNIX_SOCKET_PATH_MAX else None


def load_settings(
    cli: Mapping[str, object],
    env: Mapping[str, str],
    config_file: Path | None = None,
) -> Settings:
    """Settings from CLI values (field name → value; None = not given), env and a TOML file.

    The TOML file is `config_file`, else `$ANON_TICKET_CONFIG`, else none. Raises ConfigError
    with every problem found.
    """
    problems: list[str] = [
        f"--{name.replace('_', '-')}: unknown setting" for name in cli if name not in _SPEC_BY_NAME
    ]
    toml: dict[str, object] = {}
    toml_label = ""
    if config_file is None and (env_config := env.get(CONFIG_ENV, "").strip()):
        config_file = Path(env_config)
    if config_file is not None:
        toml_label = str(config_file)
        toml = _read_toml(config_file, problems)

    src = _Sources(cli, env, toml, toml_label)
    d = Settings()
    values: dict[str, Any] = {}
    for spec in _SPECS:
        default = getattr(d, spec.name)
        if spec.name == "data_dir":
            default = Path(os.path.abspath(default))
        values[spec.name] = src.take(spec.name, spec.parse, default)
    s = Settings(**values)
    problems.extend(src.problems)
    problems.extend(_cross_checks(s, src))
    if problems:
        raise ConfigError(problems)
    return s


def _cross_checks(s: Settings, src: _Sources) -> list[str]:
    """Rules that involve more than one setting; skipped where a setting involved was invalid."""
    out: list[str] = []
    ok = src.failed.isdisjoint

    if s.pid_bloom_entries == 0 and not s.allow_no_bloom and ok({"allow_no_bloom"}):
        out.append(
            f"{src.label('pid_bloom_entries')}: 0 turns the Bloom filter off, which needs "
            "--allow-no-bloom (ANON_TICKET_ALLOW_NO_BLOOM or API_ALLOW_NO_BLOOM)"
        )

    if (
        s.internal_bind_address is not None
        and s.internal_token is None
        and ok({"internal_token"})
        and not is_loopback_host(parse_host_port(s.internal_bind_address)[0])
    ):
        out.append(
            f"{src.label('internal_bind_address')}: the internal API on a non-loopback address "
            f"({s.internal_bind_address}) needs a token: set --internal-token or "
            "ANON_TICKET_INTERNAL_TOKEN"
        )

    if s.backoff_max_secs < s.backoff_initial_secs and ok(
        {"backoff_max_secs", "backoff_initial_secs"}
    ):
        out.append(
            f"{src.label('backoff_max_secs')}: must be >= backoff_initial_secs "
            f"({s.backoff_initial_secs:g}), got {s.backoff_max_secs:g}"
        )

    if s.unix_socket is not None and (size := _socket_too_long(s.unix_socket)):
        out.append(
            f"{src.label('unix_socket')}: the unix socket path {s.unix_socket} is {size} bytes "
            f"long, over the {UNIX_SOCKET_PATH_MAX}-byte limit of unix socket paths; "
            "use a shorter path"
        )

    internal = s.internal_socket_path
    if internal is not None and (size := _socket_too_long(internal)):
        if s.internal_unix_socket is not None:
            out.append(
                f"{src.label('internal_unix_socket')}: the unix socket path {internal} is "
                f"{size} bytes long, over the {UNIX_SOCKET_PATH_MAX}-byte limit of unix socket "
                "paths; use a shorter path"
            )
        elif ok({"data_dir"}):
            out.append(
                f"{src.label('data_dir')}: the internal socket {internal} would be {size} bytes "
                f"long, over the {UNIX_SOCKET_PATH_MAX}-byte limit of unix socket paths; use a "
                "shorter data directory or set --internal-unix-socket"
            )

    if s.unix_socket is not None and s.unix_socket == internal:
        out.append(
            f"{src.label('unix_socket')}: the public and the internal listener must not share "
            f"the socket {internal}"
        )
    return out


# --- argparse -----------------------------------------------------------------------------------


def add_setting_flags(parser: argparse.ArgumentParser, *, after_command: bool = False) -> None:
    """Add `--config` and a `--x-y` flag for every setting (booleans also get `--no-x-y`).

    `after_command`: the flags of a subcommand (`serve --dev-chain`), which must not reset
    what was given before it: an absent flag leaves no attribute at all."""
    unset = argparse.SUPPRESS if after_command else None
    group = parser.add_argument_group(
        "settings", "precedence: flag > environment > TOML file (--config) > default"
    )
    group.add_argument(
        "--config",
        type=Path,
        default=unset,
        metavar="PATH",
        help=f"TOML config file [env {CONFIG_ENV}]",
    )
    defaults = Settings()
    for spec in _SPECS:
        default = spec.default_text
        if default is None:
            value = getattr(defaults, spec.name)
            default = (
                "unset" if value is None else str(value).lower() if spec.boolean else str(value)
            )
        text = f"{spec.help} [env {', '.join(spec.env_names)}; default {default}]"
        if spec.boolean:
            group.add_argument(
                spec.flag,
                dest=spec.name,
                action=argparse.BooleanOptionalAction,
                default=unset,
                help=text,
            )
        else:
            group.add_argument(
                spec.flag,
                dest=spec.name,
                type=str,
                default=unset,
                metavar=spec.name.upper(),
                help=text,
            )


def cli_values(ns: argparse.Namespace) -> dict[str, object]:
    """The settings given on the command line (the `cli` argument of `load_settings`)."""
    return {
        spec.name: value for spec in _SPECS if (value := getattr(ns, spec.name, None)) is not None
    }
