"""What the CLI tests share: ``cli("report", "summary") -> Result(code, out, err)``, the
CLI run in-process against the database and processes of the test module's ``env``
fixture (each module sets ``TRACKING_DATABASE_URL`` and ``TRACKING_PROCESSES`` there)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from tracking.cli import main


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(env, capsys):
    """Run the CLI in-process: ``cli("report", "summary")`` -> Result(code, out, err)."""

    def run(*args: str) -> Result:
        capsys.readouterr()
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return run
