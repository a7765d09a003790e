"""prefect.yaml is the one definition of the deployments, and works on any worker machine.

A process worker runs each flow run in a new temporary directory with the worker's
environment: the deployment must not point it at the deploying machine's checkout (a
``set_working_directory`` pull step, which ``pull: null`` makes ``prefect deploy`` add), and
no deployment concurrency limit may cap the whole fleet of workers.

``deployments.serve`` (no work pool) serves what prefect.yaml declares, read from it.
"""

from __future__ import annotations

import importlib
from datetime import timedelta

import pytest
import yaml
from prefect.flows import load_flow_from_entrypoint

from deployments.automations import TRACKING_TAG
from tests.prefect.test_zombies import ROOT, deploy_prefect_yaml
from tracking.settings import DEFAULT_PROCESSES

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
    assert deployment.entrypoint == "tracking.flows.resume_flow"  # imported, not pulled


# -- deployments.serve reads prefect.yaml -------------------------------------------------------


def _serve(monkeypatch, processes: str = ",".join(DEFAULT_PROCESSES), **kwargs) -> list:
    from deployments.serve import build_deployments

    monkeypatch.setenv("TRACKING_PROCESSES", processes)
    return build_deployments(**kwargs)


def _schedules(deployment) -> list[tuple]:
    """``(cron or interval, timezone, active)`` of each of a served deployment's schedules."""
    return [(getattr(s.schedule, "cron", None) or s.schedule.interval, s.schedule.timezone,
             s.active) for s in deployment.schedules]


def _declared(entry: dict) -> list[tuple]:
    return [(s.get("cron") or timedelta(seconds=s["interval"]), s.get("timezone", "UTC"),
             s.get("active", True)) for s in entry["schedules"]]


def _process_entries(config: dict) -> list[dict]:
    return [e for e in config["deployments"] if "process" in (e.get("parameters") or {})]


def test_serve_serves_the_deployments_of_prefect_yaml_as_declared(monkeypatch) -> None:
    config = _config()
    served = {d.name: d for d in _serve(monkeypatch)}
    assert sorted(served) == sorted(e["name"] for e in config["deployments"])
    for entry in config["deployments"]:
        deployment = served[entry["name"]]
        flow = load_flow_from_entrypoint(entry["entrypoint"])
        assert (deployment.flow_name, deployment.entrypoint) == (flow.name, entry["entrypoint"])
        assert deployment.parameters == entry["parameters"]
        assert deployment.tags == entry["tags"]
        assert deployment.description == entry["description"]
        assert _schedules(deployment) == _declared(entry)
        assert deployment.concurrency_limit == entry.get("concurrency_limit")
    hourly = served["order-cancellation"]
    assert _schedules(hourly) == [("0 * * * *", "UTC", True)]
    assert hourly.parameters["max_seconds"] == 3300  # stops before the next hourly run
    assert hourly.concurrency_limit is None  # no cap on the fleet (above)


def test_a_process_without_an_entry_is_served_as_a_copy_of_one(monkeypatch) -> None:
    template = _process_entries(_config())[0]
    old = template["parameters"]["process"]
    module = importlib.import_module(template["entrypoint"].replace(":", ".").rsplit(".", 1)[0])
    deployments = _serve(monkeypatch, "tests.flow_processes:processes")
    assert [d.name for d in deployments] == ["outcomes", "busy", "slow", "slow-batch", "sessions"]
    for deployment in deployments:
        code = deployment.parameters["process"]
        # the name the API's deployment mode runs
        assert f"{deployment.flow_name}/{deployment.name}" == module.deployment_name(code)
        assert deployment.entrypoint == template["entrypoint"]
        assert deployment.parameters == {**template["parameters"], "process": code}
        assert _schedules(deployment) == _declared(template)
        assert deployment.tags == [f"process:{code}" if t == f"process:{old}" else t
                                   for t in template["tags"]]
        assert TRACKING_TAG in deployment.tags  # watched by the zombie automation
        assert code in deployment.description and old not in deployment.description


HELLO_FLOW = """
from prefect import flow


@flow(name="hello")
def hello(who: str = "world") -> str:
    return who
"""


def test_anything_added_to_prefect_yaml_is_served(monkeypatch, tmp_path) -> None:
    config = _config()
    template = _process_entries(config)[0]
    batch = yaml.safe_load(yaml.safe_dump(template))
    batch["name"] = "order-cancellation-batch"
    batch["parameters"]["granularity"] = "batch"
    batch["concurrency_limit"] = 2
    batch["schedules"] = [{"cron": "30 2 * * *", "timezone": "Europe/Paris"},
                          {"interval": 600, "active": False}]
    elsewhere = {**template, "name": "not-loaded",
                 "parameters": {**template["parameters"], "process": "NOT_LOADED_HERE"}}
    (tmp_path / "hello.py").write_text(HELLO_FLOW)
    hello = {"name": "hello", "entrypoint": "hello.py:hello", "tags": ["greeting"],
             "description": "Says hello.", "parameters": {"who": "you"},
             "schedule": {"interval": 60},  # the older single-schedule key
             "concurrency_limit": {"limit": 1, "collision_strategy": "CANCEL_NEW"}}
    config["deployments"] += [batch, elsewhere, hello]
    prefect_file = tmp_path / "prefect.yaml"
    prefect_file.write_text(yaml.safe_dump(config))

    served = {d.name: d for d in _serve(monkeypatch, prefect_file=prefect_file)}
    assert sorted(served) == sorted([template["name"], "order-cancellation-batch", "hello"])
    assert served["order-cancellation-batch"].parameters["granularity"] == "batch"
    assert served["order-cancellation-batch"].concurrency_limit == 2
    assert _schedules(served["order-cancellation-batch"]) == _declared(batch)
    greeting = served["hello"]
    assert (greeting.flow_name, greeting.parameters, greeting.tags, greeting.description) == (
        "hello", {"who": "you"}, ["greeting"], "Says hello.")
    assert greeting.entrypoint.endswith("hello.py:hello")
    assert _schedules(greeting) == [(timedelta(seconds=60), "UTC", True)]
    assert greeting.concurrency_limit == 1
    assert greeting.concurrency_options.collision_strategy == "CANCEL_NEW"

    overridden = _serve(monkeypatch, cron="*/5 * * * *", batch_size=10, prefect_file=prefect_file)
    for deployment in overridden:
        assert [s.schedule.cron for s in deployment.schedules] == ["*/5 * * * *"]
    assert {d.name: d.parameters.get("batch_size") for d in overridden}["order-cancellation"] == 10


@pytest.mark.parametrize("entry, error", [
    ({"name": "x", "entrypoint": "tracking.flows.resume_flow", "job_variables": {}},
     "serving does not support job_variables"),
    ({"name": "x"}, "needs a name and an entrypoint"),
    ({"name": "x", "entrypoint": "a.b", "schedule": {"cron": "0 * * * *"},
      "schedules": [{"cron": "0 * * * *"}]}, "both 'schedule' and 'schedules'"),
])
def test_serve_refuses_what_it_would_leave_out(tmp_path, entry, error) -> None:
    from deployments.serve import read_prefect_yaml

    prefect_file = tmp_path / "prefect.yaml"
    prefect_file.write_text(yaml.safe_dump({"deployments": [entry]}))
    with pytest.raises(ValueError, match=error):
        read_prefect_yaml(prefect_file)
