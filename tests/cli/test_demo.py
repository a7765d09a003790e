"""``make demo`` (``python -m flows.demo``) runs clean: exit code 0 and no traceback.

Prefect's temporary server used to log a ``database is locked`` traceback from its telemetry
heartbeat (``send_telemetry_heartbeat``) while the demo's first flow wrote to the same SQLite
database; the demo now starts that server with telemetry off.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def demo_env(tmp: Path) -> dict[str, str]:
    """The environment of a first run: no Prefect server, fresh Prefect home and database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "TRACKING_"))}
    env.update(
        PREFECT_HOME=str(tmp / "prefect-home"),
        TRACKING_DATABASE_URL=f"sqlite:///{tmp / 'tracking.db'}",
    )
    return env


def test_demo_prints_no_traceback(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "flows.demo"], cwd=tmp_path, env=demo_env(tmp_path),
        capture_output=True, text=True, timeout=300,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "Traceback" not in output, output
    assert "transactions by state" in done.stdout
