"""Settings: precedence, validation (every problem, named by its source), secrets, argparse."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import tomllib
from pathlib import Path

import pytest

from anon_ticket.config import (
    UNIX_SOCKET_PATH_MAX,
    Settings,
    add_setting_flags,
    cli_values,
    load_settings,
)
from anon_ticket.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config" / "anon-ticket.example.toml"
SHORT_DATA_DIR = "/srv/at"  # keeps the default internal socket path short whatever tmp_path is
TOKEN = "0123456789abcdef-internal"
LOGIN = "monero:hunter2-wallet-pass"


def load(
    cli: dict[str, object] | None = None,
    env: dict[str, str] | None = None,
    config_file: Path | None = None,
) -> Settings:
    return load_settings(
        cli or {}, {"ANON_TICKET_DATA_DIR": SHORT_DATA_DIR, **(env or {})}, config_file
    )


def problems_of(
    cli: dict[str, object] | None = None,
    env: dict[str, str] | None = None,
    config_file: Path | None = None,
) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(cli, env, config_file)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "anon-ticket.toml"
    path.write_text(text)
    return path


# --- defaults and precedence


def test_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = load_settings({}, {})
    assert s.data_dir == tmp_path / "data"
    assert s.data_dir.is_absolute()
    assert s.database_path == tmp_path / "data" / "anon-ticket.db"
    assert s.internal_socket_path == tmp_path / "data" / "internal.sock"
    assert (s.bind_host, s.bind_port) == ("127.0.0.1", 8080)
    assert s.internal_bind is None
    assert s.internal_tcp_warning is None
    assert s.log_levels() == ("INFO", {})
    assert s.min_confirmations == 10
    assert s.min_payment_amount == 10_000_000_000
    assert s.poll_interval_secs == 5.0
    assert s.pid_bloom_entries == 1_000_000
    assert s.pid_bloom_fp_rate == 1e-6
    assert s.token_derivation == "hmac"
    assert s.log_format == "text"
    assert s.dev_chain is False
    assert s.monero_rpc_url is None
    assert s.start_height is None


def test_flag_beats_env_beats_original_env_beats_toml_beats_default(tmp_path: Path) -> None:
    toml = write_toml(tmp_path, 'min_confirmations = 3\nbind_address = "127.0.0.1:3"\n')
    assert load().min_confirmations == 10
    assert load(config_file=toml).min_confirmations == 3
    env = {"MONITOR_MIN_CONFIRMATIONS": "4", "API_BIND_ADDRESS": "127.0.0.1:4"}
    s = load(env=env, config_file=toml)
    assert (s.min_confirmations, s.bind_port) == (4, 4)
    env |= {"ANON_TICKET_MIN_CONFIRMATIONS": "5", "ANON_TICKET_BIND_ADDRESS": "127.0.0.1:5"}
    s = load(env=env, config_file=toml)
    assert (s.min_confirmations, s.bind_port) == (5, 5)
    s = load({"min_confirmations": "6", "bind_address": "127.0.0.1:6"}, env, toml)
    assert (s.min_confirmations, s.bind_port) == (6, 6)


def test_log_filter_precedence(tmp_path: Path) -> None:
    toml = write_toml(tmp_path, 'log_filter = "error"\n')
    assert load(config_file=toml).log_filter == "error"
    assert load(env={"API_LOG_FILTER": "warn"}, config_file=toml).log_filter == "warn"
    env = {"API_LOG_FILTER": "warn", "ANON_TICKET_LOG_FILTER": "debug"}
    assert load(env=env, config_file=toml).log_filter == "debug"
    assert load({"log_filter": "trace"}, env, toml).log_filter == "trace"


def test_none_and_empty_env_count_as_unset() -> None:
    s = load(
        {"min_confirmations": None},
        {
            "ANON_TICKET_MIN_CONFIRMATIONS": "",
            "MONITOR_MIN_CONFIRMATIONS": "7",
            "MONERO_RPC_URL": " ",
        },
    )
    assert s.min_confirmations == 7
    assert s.monero_rpc_url is None


def test_config_file_from_env_and_argument_wins(tmp_path: Path) -> None:
    from_env = tmp_path / "env.toml"
    from_env.write_text("batch_limit = 11\n")
    from_arg = tmp_path / "arg.toml"
    from_arg.write_text("batch_limit = 22\n")
    assert load(env={"ANON_TICKET_CONFIG": str(from_env)}).batch_limit == 11
    assert load(env={"ANON_TICKET_CONFIG": str(from_env)}, config_file=from_arg).batch_limit == 22


def test_toml_natives_and_strings(tmp_path: Path) -> None:
    toml = write_toml(
        tmp_path,
        "min_payment_amount = 5\n"
        "poll_interval_secs = 2\n"
        "pid_bloom_fp_rate = 0.01\n"
        "dev_chain = true\n"
        'allow_no_bloom = "yes"\n'
        'pid_cache_capacity = "12"\n',
    )
    s = load(config_file=toml)
    assert s.min_payment_amount == 5
    assert s.poll_interval_secs == 2.0
    assert s.pid_bloom_fp_rate == 0.01
    assert s.dev_chain is True
    assert s.allow_no_bloom is True
    assert s.pid_cache_capacity == 12


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("true", True), ("TRUE", True), ("1", True), ("yes", True), ("On", True),
        ("false", False), ("False", False), ("0", False), ("no", False), ("OFF", False),
    ],
)  # fmt: skip
def test_boolean_forms(text: str, expected: bool) -> None:
    assert load(env={"API_ALLOW_NO_BLOOM": text}).allow_no_bloom is expected


def test_native_cli_values() -> None:
    s = load({"dev_chain": True, "min_confirmations": 3, "data_dir": Path("/srv/x")})
    assert (s.dev_chain, s.min_confirmations, s.data_dir) == (True, 3, Path("/srv/x"))


def test_relative_paths_resolved_against_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    s = load_settings(
        {"data_dir": "d", "unix_socket": "pub.sock"},
        {"DATABASE_URL": "sqlite://db/x.db"},
    )
    monkeypatch.chdir("/")
    assert s.data_dir == tmp_path / "d"
    assert s.unix_socket == tmp_path / "pub.sock"
    assert s.database_path == tmp_path / "db" / "x.db"
    assert s.internal_socket_path == tmp_path / "d" / "internal.sock"


# --- validation

# (field, original env name or None, bad value, words the problem must hold)
BAD_VALUES: list[tuple[str, str | None, str, str]] = [
    ("data_dir", None, "  ", "must not be empty"),
    ("database_url", "DATABASE_URL", "mysql://h/db",
     "only sqlite:// and postgres:// URLs are supported"),
    ("bind_address", "API_BIND_ADDRESS", "127.0.0.1", "host:port"),
    ("bind_address", "API_BIND_ADDRESS", "127.0.0.1:65536", "0 to 65535"),
    ("bind_address", "API_BIND_ADDRESS", "::1:8080", "brackets"),
    ("internal_bind_address", "API_INTERNAL_BIND_ADDRESS", "localhost", "host:port"),
    ("internal_token", None, "short", "at least 16 characters"),
    ("log_filter", "API_LOG_FILTER", "info,anon_ticket=loud", "unknown level 'loud'"),
    ("log_format", None, "xml", "text or json"),
    ("monero_rpc_url", "MONERO_RPC_URL", "ftp://127.0.0.1:18082", "http:// or https://"),
    ("monero_rpc_url", "MONERO_RPC_URL", "http://", "host"),
    ("monero_rpc_login", None, "nocolon", "user:password"),
    ("dev_chain", None, "maybe", "true or false"),
    ("start_height", "MONITOR_START_HEIGHT", "-1", "integer >= 0"),
    ("min_confirmations", "MONITOR_MIN_CONFIRMATIONS", "abc", "integer from 1 to 1000, got 'abc'"),
    ("min_confirmations", "MONITOR_MIN_CONFIRMATIONS", "0", "integer from 1 to 1000"),
    ("min_confirmations", "MONITOR_MIN_CONFIRMATIONS", "1001", "integer from 1 to 1000"),
    ("min_payment_amount", "MONITOR_MIN_PAYMENT_AMOUNT", "0", "integer from 1 to"),
    ("min_payment_amount", "MONITOR_MIN_PAYMENT_AMOUNT", str(2**62 + 1), "integer from 1 to"),
    ("poll_interval_secs", "MONITOR_POLL_INTERVAL_SECS", "0", "number > 0"),
    ("poll_interval_secs", "MONITOR_POLL_INTERVAL_SECS", "nan", "number > 0"),
    ("pid_bloom_entries", "API_PID_BLOOM_ENTRIES", "-5", "integer >= 0"),
    ("pid_bloom_fp_rate", "API_PID_BLOOM_FP_RATE", "1", "number > 0 and < 1"),
    ("pid_bloom_fp_rate", "API_PID_BLOOM_FP_RATE", "0", "number > 0 and < 1"),
    ("allow_no_bloom", "API_ALLOW_NO_BLOOM", "2", "true or false"),
    ("pid_cache_ttl_secs", "API_PID_CACHE_TTL_SECS", "-1", "number >= 0"),
    ("pid_cache_capacity", "API_PID_CACHE_CAPACITY", "1.5", "integer >= 0"),
    ("token_derivation", None, "sha1", "hmac or legacy"),
    ("max_body_bytes", None, "255", "integer from 256 to 1048576"),
    ("max_body_bytes", None, "1048577", "integer from 256 to 1048576"),
    ("request_timeout_secs", None, "0", "number > 0"),
    ("batch_limit", None, "0", "integer from 1 to 10000"),
    ("batch_limit", None, "10001", "integer from 1 to 10000"),
    ("grace_secs", None, "-0.5", "number >= 0"),
    ("restart_intensity", None, "0", "integer >= 1"),
    ("restart_period_secs", None, "0", "number > 0"),
    ("backoff_initial_secs", None, "0", "number > 0"),
    ("backoff_max_secs", None, "inf", "number > 0"),
]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


RULE_CASES = [
    pytest.param(source, *row, id=f"{source}-{row[0]}-{row[2]}")
    for source in ("flag", "env", "original_env", "toml")
    for row in BAD_VALUES
    if not (source == "original_env" and row[1] is None)
    # An empty environment value means unset, not bad.
    and not (row[0] == "data_dir" and source in ("env", "original_env"))
]


@pytest.mark.parametrize(("source", "name", "original", "bad", "words"), RULE_CASES)
def test_each_rule_names_its_source(
    tmp_path: Path, source: str, name: str, original: str | None, bad: str, words: str
) -> None:
    cli: dict[str, object] = {}
    env: dict[str, str] = {}
    config_file = None
    if source == "flag":
        cli[name] = bad
        label = _flag(name)
    elif source == "env":
        env["ANON_TICKET_" + name.upper()] = bad
        label = "ANON_TICKET_" + name.upper()
    elif source == "original_env":
        assert original is not None
        env[original] = bad
        label = original
    else:
        config_file = write_toml(tmp_path, f"{name} = {bad!r}\n".replace("'", '"'))
        label = f"{config_file}: {name}"
    if name == "data_dir":
        with pytest.raises(ConfigError) as info:
            load_settings(cli, env, config_file)  # without the helper's data dir
        problems = info.value.problems
    else:
        problems = problems_of(cli, env, config_file)
    assert len(problems) == 1, problems
    assert problems[0].startswith(label + ": "), problems
    assert words in problems[0], problems


def test_example_message_format() -> None:
    assert problems_of(env={"MONITOR_MIN_CONFIRMATIONS": "abc"}) == [
        "MONITOR_MIN_CONFIRMATIONS: must be an integer from 1 to 1000, got 'abc'"
    ]


def test_toml_type_problems(tmp_path: Path) -> None:
    toml = write_toml(
        tmp_path,
        "min_confirmations = 2.5\ndev_chain = 1\nbind_address = 8080\nmax_body_bytes = true\n",
    )
    problems = problems_of(config_file=toml)
    assert len(problems) == 4, problems
    assert f"{toml}: min_confirmations: must be an integer from 1 to 1000, got 2.5" in problems
    assert any(p.startswith(f"{toml}: dev_chain: must be true or false") for p in problems)
    assert any(p.startswith(f"{toml}: bind_address: must be a string") for p in problems)
    assert any(p.startswith(f"{toml}: max_body_bytes: must be an integer") for p in problems)


def test_all_problems_are_reported_together(tmp_path: Path) -> None:
    toml = write_toml(tmp_path, "batch_limit = 0\nbogus = 1\n")
    problems = problems_of(
        {"bind_address": "nope", "log_format": "yaml"},
        {
            "MONITOR_MIN_CONFIRMATIONS": "abc",
            "DATABASE_URL": "sqlite::memory:",
            "ANON_TICKET_GRACE_SECS": "-1",
        },
        toml,
    )
    assert len(problems) == 7, problems
    prefixes = [
        f"{toml}: unknown key 'bogus'",
        "--bind-address: ",
        "--log-format: ",
        "MONITOR_MIN_CONFIRMATIONS: ",
        "DATABASE_URL: ",
        "ANON_TICKET_GRACE_SECS: ",
        f"{toml}: batch_limit: ",
    ]
    for prefix in prefixes:
        assert any(p.startswith(prefix) for p in problems), (prefix, problems)


def test_no_bloom_needs_allow_no_bloom() -> None:
    problems = problems_of(env={"API_PID_BLOOM_ENTRIES": "0"})
    assert len(problems) == 1
    assert problems[0].startswith("API_PID_BLOOM_ENTRIES: 0 turns the Bloom filter off")
    assert "allow-no-bloom" in problems[0]
    s = load(env={"API_PID_BLOOM_ENTRIES": "0", "API_ALLOW_NO_BLOOM": "true"})
    assert s.pid_bloom_entries == 0


def test_backoff_max_below_initial() -> None:
    problems = problems_of({"backoff_initial_secs": "2", "backoff_max_secs": "1"})
    assert problems == ["--backoff-max-secs: must be >= backoff_initial_secs (2), got 1"]


# --- database URL


def test_database_url_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load(env={"DATABASE_URL": "sqlite:///var/lib/x.db"}).database_path == Path(
        "/var/lib/x.db"
    )
    assert load(env={"DATABASE_URL": "sqlite://rel/x.db"}).database_path == tmp_path / "rel/x.db"
    assert load(env={"DATABASE_URL": "sqlite://x.db?mode=rwc"}).database_path == tmp_path / "x.db"
    assert load(env={"DATABASE_URL": "sqlite:///abs/x.db?mode=rwc"}).database_path == Path(
        "/abs/x.db"
    )
    assert load().database_path == Path(SHORT_DATA_DIR) / "anon-ticket.db"


def test_a_postgres_url_is_kept_and_its_password_never_described() -> None:
    settings = load(env={"DATABASE_URL": "postgres://anon:s3cret@db.example:5433/tickets"})
    assert settings.postgres_url == "postgres://anon:s3cret@db.example:5433/tickets"
    described = settings.describe()
    assert described["database_url"] == "postgres://anon:***@db.example:5433/tickets"
    assert "s3cret" not in json.dumps(described)
    assert load(env={"DATABASE_URL": "postgresql:///tickets?host=/run/pg"}).postgres_url
    assert load().postgres_url is None


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("mysql://user:pw@host/db", "only sqlite:// and postgres:// URLs are supported"),
        ("postgres://user:pw@host/db?bogus=1", "not a valid PostgreSQL URL"),
        ("x.db", "only sqlite:// and postgres:// URLs are supported"),
        ("sqlite:x.db", "only sqlite:// and postgres:// URLs are supported"),
        ("sqlite://x.db?mode=ro", "unsupported query mode=ro"),
        ("sqlite://x.db?cache=shared", "unsupported query cache=shared"),
        ("sqlite::memory:", "in-memory"),
        ("sqlite://:memory:", "in-memory"),
        ("sqlite://x.db?mode=memory", "in-memory"),
        ("sqlite://", "no database file"),
    ],
)
def test_bad_database_urls(url: str, words: str) -> None:
    problems = problems_of(env={"DATABASE_URL": url})
    assert len(problems) == 1
    assert problems[0].startswith("DATABASE_URL: ")
    assert words in problems[0]
    assert "pw" not in problems[0]


# --- listeners


def test_bind_address_forms() -> None:
    s = load(env={"API_BIND_ADDRESS": "[::1]:8443"})
    assert (s.bind_host, s.bind_port) == ("::1", 8443)
    s = load({"bind_address": "0.0.0.0:0"})
    assert (s.bind_host, s.bind_port) == ("0.0.0.0", 0)
    s = load({"bind_address": "api.example.org:80"})
    assert (s.bind_host, s.bind_port) == ("api.example.org", 80)


@pytest.mark.parametrize("bad", ["[::1]8080", "[nothex]:80", "bad host:80", ":80", "h:-1", "h:x"])
def test_bad_bind_addresses(bad: str) -> None:
    problems = problems_of({"bind_address": bad})
    assert len(problems) == 1 and problems[0].startswith("--bind-address: ")


def test_socket_path_length() -> None:
    ok = "/" + "s" * (UNIX_SOCKET_PATH_MAX - 1)
    assert load({"unix_socket": ok}).unix_socket == Path(ok)
    too_long = ok + "x"
    problems = problems_of({"unix_socket": too_long})
    assert len(problems) == 1
    assert problems[0].startswith("--unix-socket: ")
    assert "108 bytes" in problems[0] and "107-byte limit" in problems[0]

    problems = problems_of(env={"API_INTERNAL_UNIX_SOCKET": too_long})
    assert len(problems) == 1 and problems[0].startswith("API_INTERNAL_UNIX_SOCKET: ")
    assert "107-byte limit" in problems[0]

    # Multi-byte characters count as bytes.
    assert problems_of({"unix_socket": "/" + "é" * 60})


def test_long_data_dir_makes_default_internal_socket_too_long() -> None:
    long_dir = "/" + "d" * 100
    problems = problems_of({"data_dir": long_dir})
    assert len(problems) == 1
    assert problems[0].startswith("--data-dir: the internal socket ")
    assert "107-byte limit" in problems[0] and "--internal-unix-socket" in problems[0]
    s = load({"data_dir": long_dir, "internal_unix_socket": "/run/at.sock"})
    assert s.internal_socket_path == Path("/run/at.sock")
    s = load({"data_dir": long_dir, "internal_bind_address": "127.0.0.1:9090"})
    assert s.internal_socket_path is None


def test_public_and_internal_socket_must_differ() -> None:
    problems = problems_of({"unix_socket": "/run/a.sock", "internal_unix_socket": "/run/a.sock"})
    assert len(problems) == 1 and problems[0].startswith("--unix-socket: ")


def test_internal_tcp_non_loopback_needs_token() -> None:
    problems = problems_of(env={"API_INTERNAL_BIND_ADDRESS": "0.0.0.0:9090"})
    assert len(problems) == 1
    assert problems[0].startswith("API_INTERNAL_BIND_ADDRESS: ")
    assert "ANON_TICKET_INTERNAL_TOKEN" in problems[0]
    assert problems_of({"internal_bind_address": "internal.example.org:9090"})

    s = load(env={"API_INTERNAL_BIND_ADDRESS": "0.0.0.0:9090", "ANON_TICKET_INTERNAL_TOKEN": TOKEN})
    assert s.internal_bind == ("0.0.0.0", 9090)
    assert s.internal_socket_path is None
    assert s.internal_tcp_warning is None


@pytest.mark.parametrize("addr", ["127.0.0.1:9090", "127.1.2.3:9090", "[::1]:9090", "localhost:9"])
def test_internal_tcp_loopback_warns_without_token(addr: str) -> None:
    s = load(env={"API_INTERNAL_BIND_ADDRESS": addr})
    assert s.internal_bind is not None
    assert s.internal_socket_path is None
    assert s.internal_tcp_warning is not None and "token" in s.internal_tcp_warning
    s = load(env={"API_INTERNAL_BIND_ADDRESS": addr, "ANON_TICKET_INTERNAL_TOKEN": TOKEN})
    assert s.internal_tcp_warning is None


def test_internal_unix_socket_wins_over_tcp() -> None:
    s = load(
        env={"API_INTERNAL_UNIX_SOCKET": "/run/i.sock", "API_INTERNAL_BIND_ADDRESS": "127.0.0.1:1"}
    )
    assert s.internal_socket_path == Path("/run/i.sock")
    assert s.internal_bind is None
    assert s.internal_tcp_warning is not None and "ignored" in s.internal_tcp_warning


# --- monero RPC URL, log filter


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:18082", "http://127.0.0.1:18082/json_rpc"),
        ("http://127.0.0.1:18082/", "http://127.0.0.1:18082/json_rpc"),
        ("http://127.0.0.1:18082/json_rpc", "http://127.0.0.1:18082/json_rpc"),
        ("HTTPS://wallet.example.org/json_rpc/", "https://wallet.example.org/json_rpc"),
        ("https://proxy.example.org/wallet", "https://proxy.example.org/wallet/json_rpc"),
        ("http://[::1]:18082", "http://[::1]:18082/json_rpc"),
    ],
)
def test_monero_rpc_url_normalised(url: str, expected: str) -> None:
    assert load(env={"MONERO_RPC_URL": url}).monero_rpc_url == expected


def test_monero_rpc_url_with_credentials_refused_without_echo() -> None:
    problems = problems_of(env={"MONERO_RPC_URL": "http://user:s3cr3t@127.0.0.1:18082"})
    assert len(problems) == 1
    assert "credentials" in problems[0] and "s3cr3t" not in problems[0]
    problems = problems_of(env={"MONERO_RPC_URL": "ftp://user:s3cr3t@127.0.0.1:18082"})
    assert "s3cr3t" not in problems[0]


def test_monero_rpc_url_bad_port_or_query() -> None:
    assert "port" in problems_of(env={"MONERO_RPC_URL": "http://h:99999"})[0]
    assert "query" in problems_of(env={"MONERO_RPC_URL": "http://h:1/json_rpc?x=1"})[0]


def test_log_levels() -> None:
    s = load(env={"API_LOG_FILTER": "warn,anon_ticket_monitor=trace,hypercorn::access=off"})
    assert s.log_levels() == (
        "WARNING",
        {"actors.poller": "DEBUG", "hypercorn.access": "CRITICAL"},
    )
    level, targets = load({"log_filter": "anon_ticket=debug"}).log_levels()
    assert level == "WARNING"
    assert targets == {"anon_ticket": "DEBUG", "actors": "DEBUG", "supervisors": "DEBUG"}
    assert load({"log_filter": "ERROR, ,"}).log_levels() == ("ERROR", {})
    assert load({"log_filter": "info,actors.storage"}).log_levels() == (
        "INFO",
        {"actors.storage": "DEBUG"},
    )


@pytest.mark.parametrize("bad", ["", ",", "info,=debug", "info,a b=debug", "foo/bar"])
def test_bad_log_filters(bad: str) -> None:
    problems = problems_of({"log_filter": bad})
    assert len(problems) == 1 and problems[0].startswith("--log-filter: ")


# --- TOML file


def test_unknown_toml_key_refused(tmp_path: Path) -> None:
    toml = write_toml(tmp_path, "min_confirmation = 3\n[server]\nport = 1\n")
    problems = problems_of(config_file=toml)
    assert problems == [
        f"{toml}: unknown key 'min_confirmation' (did you mean 'min_confirmations'?)",
        f"{toml}: unknown key 'server'",
    ]


def test_missing_and_invalid_toml(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    problems = problems_of(config_file=missing)
    assert len(problems) == 1 and problems[0].startswith(f"{missing}: cannot read config file")
    problems = problems_of(env={"ANON_TICKET_CONFIG": str(missing)})
    assert len(problems) == 1 and str(missing) in problems[0]

    broken = write_toml(tmp_path, "min_confirmations = \n")
    problems = problems_of(config_file=broken)
    assert len(problems) == 1 and problems[0].startswith(f"{broken}: invalid TOML")

    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe = 1\n")
    assert problems_of(config_file=binary)[0].startswith(f"{binary}: invalid TOML")


def test_toml_problem_and_env_problem_both_reported(tmp_path: Path) -> None:
    broken = write_toml(tmp_path, "not toml at all\n")
    problems = problems_of(env={"MONITOR_MIN_CONFIRMATIONS": "x"}, config_file=broken)
    assert len(problems) == 2


def _example_keys() -> dict[str, object]:
    lines = [
        line[2:] for line in EXAMPLE.read_text().splitlines() if re.match(r"# [a-z_]+ = ", line)
    ]
    return tomllib.loads("\n".join(lines))


def test_example_file_covers_every_setting_with_its_default() -> None:
    example = _example_keys()
    names = {f.name for f in dataclasses.fields(Settings)}
    assert set(example) == names
    defaults = Settings()
    for name, value in example.items():
        default = getattr(defaults, name)
        if default is not None and not isinstance(default, Path):
            assert value == default, name
    # The example parses as-is (every line commented out) and loads.
    assert tomllib.loads(EXAMPLE.read_text()) == {}
    assert load(config_file=EXAMPLE) == load()


def test_example_file_names_env_variables() -> None:
    text = EXAMPLE.read_text()
    for name in (f.name for f in dataclasses.fields(Settings)):
        assert "ANON_TICKET_" + name.upper() in text, name
    for original in {o for _, o, _, _ in BAD_VALUES if o} | {"API_UNIX_SOCKET"}:
        assert original in text, original


# --- secrets


def test_describe_hides_secrets() -> None:
    s = load(
        env={
            "ANON_TICKET_INTERNAL_TOKEN": TOKEN,
            "ANON_TICKET_MONERO_RPC_LOGIN": LOGIN,
            "MONERO_RPC_URL": "http://127.0.0.1:18082",
        }
    )
    assert s.internal_token == TOKEN
    assert s.monero_rpc_login == LOGIN
    described = s.describe()
    assert described["internal_token"] == "***"
    assert described["monero_rpc_login"] == "***"
    assert described["monero_rpc_url"] == "http://127.0.0.1:18082/json_rpc"
    assert described["data_dir"] == SHORT_DATA_DIR
    assert described["database_path"] == SHORT_DATA_DIR + "/anon-ticket.db"
    assert described["internal_socket_path"] == SHORT_DATA_DIR + "/internal.sock"
    for shown in (str(described), repr(s)):
        assert TOKEN not in shown and "hunter2" not in shown
    assert load().describe()["internal_token"] is None


def test_problems_never_echo_secrets(tmp_path: Path) -> None:
    bad_token = "tok en with spaces inside"
    bad_login = "no-colon-hunter2"
    toml = write_toml(tmp_path, "internal_token = 12345678901234567\nmonero_rpc_login = 5\n")
    problems = problems_of(
        {"internal_token": bad_token},
        {"ANON_TICKET_MONERO_RPC_LOGIN": bad_login},
    )
    assert len(problems) == 2
    assert problems[0].startswith("--internal-token: ")
    assert problems[1].startswith("ANON_TICKET_MONERO_RPC_LOGIN: ")
    joined = "\n".join(problems)
    assert bad_token not in joined and "hunter2" not in joined
    problems = problems_of(config_file=toml)
    assert len(problems) == 2
    assert "12345678901234567" not in "\n".join(problems)


# --- argparse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anon-ticket")
    add_setting_flags(parser)
    return parser


def test_flags_round_trip() -> None:
    ns = _parser().parse_args(
        [
            "--config", "/etc/anon-ticket.toml",
            "--min-confirmations", "3",
            "--bind-address", "[::1]:9000",
            "--dev-chain",
            "--no-allow-no-bloom",
            "--database-url", "sqlite:///var/lib/a.db",
        ]
    )  # fmt: skip
    assert ns.config == Path("/etc/anon-ticket.toml")
    values = cli_values(ns)
    assert values == {
        "min_confirmations": "3",
        "bind_address": "[::1]:9000",
        "dev_chain": True,
        "allow_no_bloom": False,
        "database_url": "sqlite:///var/lib/a.db",
    }
    s = load(values, {"API_ALLOW_NO_BLOOM": "true", "MONITOR_MIN_CONFIRMATIONS": "9"})
    assert s.min_confirmations == 3
    assert (s.bind_host, s.bind_port) == ("::1", 9000)
    assert s.dev_chain is True
    assert s.allow_no_bloom is False  # --no-x-y beats the environment
    assert s.database_path == Path("/var/lib/a.db")


def test_no_flags_give_no_values() -> None:
    ns = _parser().parse_args([])
    assert ns.config is None
    assert cli_values(ns) == {}


def test_every_setting_has_a_flag_that_round_trips() -> None:
    parser = _parser()
    for f in dataclasses.fields(Settings):
        if f.type in ("bool", bool):
            ns = parser.parse_args([_flag(f.name)])
            assert cli_values(ns) == {f.name: True}
            ns = parser.parse_args(["--no-" + _flag(f.name)[2:]])
            assert cli_values(ns) == {f.name: False}
        else:
            ns = parser.parse_args([_flag(f.name), "v"])
            assert cli_values(ns) == {f.name: "v"}


def test_help_names_env_variables() -> None:
    text = _parser().format_help()
    assert "ANON_TICKET_MIN_CONFIRMATIONS" in text and "MONITOR_MIN_CONFIRMATIONS" in text
    assert "--no-dev-chain" in text


def test_flag_problem_uses_flag_name() -> None:
    ns = _parser().parse_args(["--bind-address", "nope", "--max-body-bytes", "1"])
    problems = problems_of(cli_values(ns))
    assert len(problems) == 2
    assert problems[0].startswith("--bind-address: ")
    assert problems[1].startswith("--max-body-bytes: ")


def test_the_readme_settings_table_is_the_settings_table() -> None:
    # Every setting is declared once (anon_ticket/config.py `_SPECS`); the README's table is
    # made from it and must not drift from it.
    from anon_ticket.config import settings_table
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert settings_table() in readme
