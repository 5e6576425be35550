"""The operator-facing parts of flows/deployments.py and infra/ that need no worker: run keys
templated by the scheduled date, error hints in deployment terms, the evolve-completed event,
and the shipped schedule, triggers and automations (the worker run is
tests/integration/test_deployment.py)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import yaml

from evomerge.flows.deployments import (
    COMPLETED_EVENT,
    _for_deployment,
    completed_event,
    expand_run_key,
    slot_name,
)
from evomerge_core.config.schema import parse_run_config
from evomerge_core.errors import ConfigError, UsageError

REPO = Path(__file__).resolve().parents[2]
MONDAY = dt.datetime(2026, 12, 7, 3, 0, tzinfo=dt.timezone.utc)


def test_date_run_keys_are_fresh_per_scheduled_run_and_stable_per_run():
    week1 = expand_run_key("weekly-{date}", MONDAY)
    week2 = expand_run_key("weekly-{date}", MONDAY + dt.timedelta(days=7))
    assert (week1, week2) == ("weekly-2026-12-07", "weekly-2026-12-14")
    assert expand_run_key("weekly-{date}", MONDAY) == week1  # a retry of the same flow run keeps its key
    assert expand_run_key("h-{datetime}", MONDAY.astimezone(dt.timezone(dt.timedelta(hours=9)))) == "h-2026-12-07T0300"
    assert expand_run_key("plain", MONDAY) == "plain"
    with pytest.raises(UsageError, match=r"unknown field\(s\) \['week'\].*\{date\}"):
        expand_run_key("weekly-{week}", MONDAY)


def test_error_hints_name_deployment_parameters_not_cli_flags():
    text = _for_deployment(ConfigError("the config changed; use --no-resume to start over, or another --run-key"))
    assert "--" not in text and "resume=false" in text and "the parameter run_key" in text


def test_slot_names_are_valid_and_per_run_key():
    assert slot_name("Weekly_2026-12-07") == "evomerge-run-weekly-2026-12-07"
    assert slot_name("a") != slot_name("b")


def test_completed_event_names_the_run_and_its_result(tmp_path):
    cfg = parse_run_config({"run_key": "r1", "storage": f"file://{tmp_path}/runs",
                            "sources": [{"model": str(tmp_path / "base"), "base": True}, {"model": str(tmp_path / "ft")}],
                            "fitness": {"dataset": {"path": str(tmp_path / "d.jsonl")}}})
    event = completed_event(cfg, {"best_fitness": -1.5, "best_model": f"file://{tmp_path}/runs/r1/best"})
    assert event["event"] == COMPLETED_EVENT == "evomerge.evolve.completed"
    assert event["resource"]["prefect.resource.id"] == "evomerge.run.r1"
    assert event["payload"]["run_key"] == "r1" and event["payload"]["storage"] == f"file://{tmp_path}/runs"
    assert event["payload"]["result"] == f"file://{tmp_path}/runs/r1/result.json"
    assert event["payload"]["best_fitness"] == -1.5 and event["payload"]["publish_repo_id"] == ""


def test_shipped_schedule_triggers_and_automations():
    from prefect.events.schemas.automations import AutomationCore, Posture

    spec = yaml.safe_load((REPO / "infra/prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    (schedule,) = deployments["evolve"]["schedules"]
    assert "{date}" in schedule["parameters"]["run_key"]
    assert schedule["parameters"]["config_path"].endswith("examples/toyworld-ps.yaml")
    for name in ("evolve", "resume"):
        assert deployments[name]["work_pool"]["job_variables"]["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"
    gpu = deployments["evolve-gpu"]
    assert gpu["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == "/opt/evomerge"
    (trigger,) = deployments["publish-run"]["triggers"]
    assert trigger["expect"] == [COMPLETED_EVENT] and trigger["parameters"]["run_key"] == "{{ event.payload.run_key }}"
    automations = yaml.safe_load((REPO / "infra/automations.yaml").read_text())["automations"]
    (crash,) = [AutomationCore.model_validate(a) for a in automations]
    assert crash.trigger.posture == Posture.Proactive and crash.trigger.within == dt.timedelta(seconds=90)
    assert "prefect.flow-run.heartbeat" in crash.trigger.after and crash.actions[0].state.value == "CRASHED"
    deploy = (REPO / "infra/deploy.sh").read_text()
    assert 'if [ -n "${EVOMERGE_IMAGE:-}" ]' in deploy and "--all" not in deploy
