"""``Platform(concurrency=N)``: at most N calls of that platform at once, through a Prefect
global concurrency limit that only its task runs use."""

from __future__ import annotations

import pytest
from prefect.client.orchestration import get_client

from tests import flow_processes
from tracking.decorator import concurrency_limit_name
from tracking.flows import intake_flow, resume_flow


@pytest.mark.parametrize("granularity", ["stage", "batch"])
def test_a_platform_with_one_session_runs_one_call_at_a_time(env, granularity):
    flow_processes.peak.clear()
    intake_flow(process="SESSIONS", items=[{"id": f"{granularity}-{i}"} for i in range(6)])
    summary = resume_flow(process="SESSIONS", granularity=granularity, batch_size=2,
                          concurrency=3)
    assert summary["stages_run"] == 12
    assert flow_processes.peak["ROBOT"] == 1
    if granularity == "stage":  # (a batch's calls run one after the other)
        assert flow_processes.peak["FREE"] > 1  # the unlimited platform ran side by side
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(
            concurrency_limit_name("SESSIONS", "ROBOT"))
    assert limit.limit == 1
