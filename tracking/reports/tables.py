"""What the report queries share: the tables, and the join to the stage a transaction waits
at (its first stage not COMPLETED)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from tracking.models import CatalogPlatform, CatalogProcess, StageState, TxEvent, TxProcess, TxStage

TX = TxProcess.__table__
STAGE = TxStage.__table__
EVENT = TxEvent.__table__
STAGE_2 = STAGE.alias("stage_2")
CATALOG_PROCESS = CatalogProcess.__table__
CATALOG_PLATFORM = CatalogPlatform.__table__


def with_waiting_stage() -> Any:
    """``tx_process`` joined to the stage each transaction waits at (one row each)."""
    first_open = (
        sa.select(sa.func.min(STAGE_2.c.seq))
        .where(STAGE_2.c.uuid == TX.c.uuid, STAGE_2.c.state != StageState.COMPLETED)
        .scalar_subquery()
    )
    return TX.join(STAGE, sa.and_(STAGE.c.uuid == TX.c.uuid, STAGE.c.seq == first_open))
