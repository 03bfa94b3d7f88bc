"""schemathesis against the real process, driven by the checked-in OpenAPI document.

The server runs as an operator runs it (no chain: the wallet address is unused, so `/healthz`
says `degraded` and nothing is claimable; nothing is paid). schemathesis generates requests
from the document, valid and invalid (its examples, coverage, fuzzing and stateful phases),
and checks every answer: no 5xx, only documented statuses, documented content types, headers
(`Retry-After`, `Allow`) and bodies, 405 with `Allow` for methods a path does not list, and
no answer slower than MAX_RESPONSE_SECS (a hang is a request timeout: an error).

The websocket (`GET /api/v1/watch`) is excluded: a handshake that succeeds is answered 101 and
switches the connection to a protocol schemathesis's HTTP client cannot speak (and it counts
a 101 as neither a success nor a refusal). tests/test_openapi.py checks its plain-GET answer
against the document, and tests/actors/test_watch.py tests the protocol.

Bounded: MAX_EXAMPLES per operation, a fixed seed (the same cases each run; set
ANON_TICKET_FUZZ_SEED to explore others), about 15 s on 2 cores. schemathesis writes
`.schemathesis/` and `.hypothesis/` into its working directory: here, the test's tmp_path.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from anon_ticket import openapi
from tests.process.proc import start_server

pytestmark = pytest.mark.process

DOCUMENT = Path(openapi.__file__).with_name("openapi.json")
MAX_EXAMPLES = 100
REQUEST_TIMEOUT_SECS = 5
MAX_RESPONSE_SECS = 2
RUN_LIMIT_SECS = 80
CHECKS = ",".join([
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "positive_data_acceptance",
    "missing_required_header",
    "unsupported_method",
    "allow_header_conformance",
])


def test_schemathesis_finds_nothing_against_the_real_server(tmp_path: Path) -> None:
    server = start_server(tmp_path / "data")
    try:
        started = time.monotonic()
        run = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "run", str(DOCUMENT),
             "--url", server.url,
             "--exclude-path", "/api/v1/watch",
             "--checks", CHECKS,
             "--max-response-time", str(MAX_RESPONSE_SECS),
             "--request-timeout", str(REQUEST_TIMEOUT_SECS),
             "--max-examples", str(MAX_EXAMPLES),
             "--seed", os.environ.get("ANON_TICKET_FUZZ_SEED", "1"),
             "--workers", "1",
             "--generation-database", "none",
             "--no-color"],
            cwd=tmp_path, capture_output=True, text=True, timeout=RUN_LIMIT_SECS)
        took = time.monotonic() - started
        report = run.stdout + run.stderr
        assert run.returncode == 0, f"schemathesis found problems:\n{report}"
        assert " passed" in report and "5 selected / 6 total" in report, report
        assert server.proc.poll() is None, "the server died under the fuzzer"
        assert "unhandled error" not in server.log(), server.log()
        print(f"schemathesis: {took:.1f} s\n{report[-600:]}")
    finally:
        server.stop()
