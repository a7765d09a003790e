"""prefect.yaml works on worker machines other than the one that ran ``prefect deploy``.

A process worker runs each flow run in a new temporary directory with the worker's
environment: the deployment must not point it at the deploying machine's checkout (a
``set_working_directory`` pull step, which ``pull: null`` makes ``prefect deploy`` add), and
no deployment concurrency limit may cap the whole fleet of workers.
"""

from __future__ import annotations

import pytest
import yaml

from tests.test_zombies import ROOT, deploy_prefect_yaml

DEPLOYMENT = "resume/order-cancellation"


def _config() -> dict:
    return yaml.safe_load((ROOT / "prefect.yaml").read_text())


def test_prefect_yaml_pulls_nothing_and_limits_no_deployment() -> None:
    config = _config()
    assert config["pull"] == []  # explicit: null would make prefect deploy add a pull step
    for deployment in config["deployments"]:
        assert "concurrency_limit" not in deployment


def _deployment():
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(DEPLOYMENT)


def _limit(deployment) -> int | None:
    """The deployment's concurrency limit (Prefect keeps it as a global concurrency limit)."""
    limit = deployment.global_concurrency_limit
    return limit.limit if limit is not None else None


@pytest.mark.slow
def test_deployed_runs_need_no_checkout_and_redeploying_lifts_an_old_limit(
    prefect_harness, tmp_path
) -> None:
    config = _config()
    for deployment in config["deployments"]:
        deployment["concurrency_limit"] = 2  # as prefect.yaml had it
    old = tmp_path / "prefect.yaml"
    old.write_text(yaml.safe_dump(config))
    deploy_prefect_yaml(old)
    assert _limit(_deployment()) == 2
    deploy_prefect_yaml()
    deployment = _deployment()
    assert _limit(deployment) is None
    assert not deployment.pull_steps  # runs start in the worker's temporary directory
    assert deployment.entrypoint == "tracking.runner.resume_flow"  # imported, not pulled
