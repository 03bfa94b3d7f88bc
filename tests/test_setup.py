"""scripts/setup.sh on a machine where everything is installed: it only checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_second_setup_only_checks() -> None:
    # The suite runs after scripts/test.sh installed everything, so this is a second run.
    site = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    before = (site / "site-packages").stat().st_mtime_ns
    done = subprocess.run(["bash", "scripts/setup.sh", "--test"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""  # no reinstall, no setuptools banner
    assert (site / "site-packages").stat().st_mtime_ns == before
