"""The README's walkthrough, run as written: command 1 (`scripts/run.sh`, the service on its
own local regtest chain) on a copy of the checkout, then the shell block that follows
"Then, from another shell:", verbatim, against it. The README's claims about it (how long the
first start takes, what each redeem answers) are what this sees."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.process, pytest.mark.chain]

ROOT = Path(__file__).resolve().parents[2]
SKIP = {".venv", "data", ".git", ".mypy_cache", ".ruff_cache", ".hypothesis", "__pycache__",
        ".schemathesis", "build", "dist"}


def walkthrough() -> str:
    readme = (ROOT / "README.md").read_text()
    after = readme[readme.index("Then, from another shell:"):]
    block = re.search(r"```sh\n(.*?)```", after, re.S)
    assert block is not None, "README: no shell block after 'Then, from another shell:'"
    return block.group(1)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_the_readme_walkthrough_runs_as_written(tmp_path: Path) -> None:
    if not port_free(8080):
        pytest.skip("port 8080 (the README's) is taken on this machine")
    copy = tmp_path / "checkout"
    shutil.copytree(ROOT, copy, ignore=lambda _d, names: [n for n in names if n in SKIP
                                                           or n.endswith(".egg-info")])
    (copy / ".venv").symlink_to(ROOT / ".venv")  # installed already: setup.sh only checks
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ANON_TICKET_", "MONERO_"))}
    log = (tmp_path / "server.log").open("wb")
    started = time.monotonic()
    server = subprocess.Popen(["bash", "scripts/run.sh"], cwd=copy, env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = started + 300
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-4000:]
            try:
                if httpx.get("http://localhost:8080/api/v1/info", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "command 1 was not serving after 300 s"
            time.sleep(0.5)
        ready = time.monotonic() - started
        shown = time.monotonic()
        run = subprocess.run(["bash", "-euo", "pipefail", "-c", walkthrough()], cwd=copy,
                             env=env, capture_output=True, text=True, timeout=240)
        took = time.monotonic() - shown
        print(f"command 1 ready after {ready:.1f} s; the walkthrough took {took:.1f} s")
        assert run.returncode == 0, run.stdout + run.stderr
        out = run.stdout
        assert re.search(r"^Payment ID: [0-9a-f]{16}$", out, re.M), out
        lines = out.splitlines()
        assert '{"error":"payment not found"}' in lines, out  # the first redeem
        assert re.fullmatch(r'\{"status":"success","service_token":"[0-9a-f]{64}",'
                            r'"balance":1500000000000\}', lines[-1]), out
        # watch's lines: the state, and the confirmation if it came after the subscribe
        assert '"type":"state"' in out.replace(" ", ""), out
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            code = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            raise
        log.close()
    assert code == 0, (tmp_path / "server.log").read_text()[-4000:]
    left = subprocess.run(["pgrep", "-f", str(copy)], capture_output=True, text=True).stdout
    assert not left, f"processes of the walkthrough left running: {left}"
