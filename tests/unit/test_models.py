"""``models.from_row``: the instance a whole database row builds, as ``model_construct``
builds it (it stands in for it on the hot paths, so a pydantic upgrade that changes what an
instance holds must fail here); ``UTCDateTime``: the text a timestamp is stored as on SQLite."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa

from tracking.models import StageState, TxProcess, TxStage, TxState, UTCDateTime, from_row

NOW = datetime(2026, 12, 2, 8, 0, tzinfo=UTC)


def stage_row() -> dict:
    row = {name: None for name in TxStage.model_fields}
    row.update(id=7, uuid="u-1", process_code="P", platform="A", stage="main",
               state=StageState.IN_PROGRESS, attempt=2, created_at=NOW, updated_at=NOW)
    return row


def test_from_row_builds_what_model_construct_builds() -> None:
    row = stage_row()
    built, expected = from_row(TxStage, dict(row)), TxStage.model_construct(**row)
    assert built == expected
    assert built.model_fields_set == expected.model_fields_set
    assert (built.__pydantic_extra__, built.__pydantic_private__) == (
        expected.__pydantic_extra__, expected.__pydantic_private__)
    assert built.model_dump() == expected.model_dump()
    assert built.attempt == 2 and built.state == StageState.IN_PROGRESS


def test_from_row_instances_behave_as_models() -> None:
    tx_row = {name: None for name in TxProcess.model_fields}
    tx_row.update(uuid="u-1", process_code="P", state=TxState.PENDING, payload={"id": 1})
    tx = from_row(TxProcess, tx_row)
    stage = from_row(TxStage, stage_row())
    stage.__dict__["transaction"] = tx
    assert stage.transaction.payload == {"id": 1}
    assert stage.model_copy(update={"attempt": 3}).attempt == 3


def test_from_row_works_before_anything_else_set_the_mappers_up() -> None:
    """In a fresh interpreter, the first instance built is usable (a resume run's first
    recorded stage failed reading ``.attempt`` once claims stopped building instances)."""
    code = ("from tracking.models import TxStage, from_row\n"
            "s = from_row(TxStage, {c: 1 for c in TxStage.__table__.c.keys()})\n"
            "print(s.attempt)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)
    assert (done.returncode, done.stdout.strip()) == (0, "1"), done.stderr[-2000:]


def test_sqlite_timestamps_are_stored_as_utc_text_whatever_the_zone_and_naive_refused() -> None:
    """One instant is one stored text (the timestamps compare as text on SQLite), from any
    zone, also after the same instant was bound before (the conversions are remembered);
    a naive value is refused even when an equal aware one was just bound."""
    bind = UTCDateTime().bind_processor(sa.create_engine("sqlite://").dialect)
    at = datetime(2026, 12, 7, 21, 30, 5, 120, tzinfo=UTC)
    paris = at.astimezone(timezone(timedelta(hours=1)))
    assert bind(at) == "2026-12-07 21:30:05.000120"
    assert bind(paris) == bind(at) == "2026-12-07 21:30:05.000120"
    assert bind(datetime(2026, 12, 7, 22, 30, 5, tzinfo=timezone(timedelta(hours=1)))) \
        == "2026-12-07 21:30:05.000000"
    assert bind(None) is None
    with pytest.raises(ValueError, match="naive datetime"):
        bind(at.replace(tzinfo=None))


def test_the_repeated_hour_of_a_dst_change_is_stored_as_two_instants() -> None:
    """At the end of summer time 02:30 in Paris happens twice (``fold`` 0 and 1): Python
    calls the two equal (same zone, same wall time), but they are an hour apart and must be
    stored so, whichever was bound first."""
    bind = UTCDateTime().bind_processor(sa.create_engine("sqlite://").dialect)
    first = datetime(2026, 10, 25, 2, 30, tzinfo=ZoneInfo("Europe/Paris"))
    second = first.replace(fold=1)
    assert bind(first) == "2026-10-25 00:30:00.000000"
    assert bind(second) == "2026-10-25 01:30:00.000000"
