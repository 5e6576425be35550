"""`runtime.task_runner` config (validation, no effect on hashes/candidate keys, resumable with
another runner) and the static infra files (prefect.yaml, Kubernetes GPU job template)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from evomerge_core.config.schema import parse_run_config
from evomerge_core.errors import ConfigError
from evomerge_core.runs.resume import ALLOWED_CHANGES, evaluation_config
from evomerge_core.runs.store import diff_configs

REPO = Path(__file__).resolve().parents[2]
BASE = {"sources": [{"model": "a", "base": True}, {"model": "b"}], "fitness": {"dataset": {"path": "x.jsonl"}}}


def _cfg(task_runner=None, **runtime):
    if task_runner is not None:
        runtime["task_runner"] = task_runner
    return parse_run_config({**BASE, "runtime": runtime})


def test_default_runner_dumps_as_before_and_dask_round_trips():
    assert "task_runner" not in _cfg().model_dump(mode="json")["runtime"]
    dask = _cfg({"kind": "dask", "workers": 3, "memory_limit": "2GiB"})
    again = parse_run_config(dask.model_dump(mode="json"))
    assert again.runtime.task_runner == dask.runtime.task_runner
    assert again.runtime.task_runner.worker_count() == 3
    remote = _cfg({"kind": "dask", "address": "tcp://127.0.0.1:8786"})
    assert parse_run_config(remote.model_dump(mode="json")).runtime.task_runner.worker_count() is None


def test_runner_changes_neither_hash_nor_candidate_keys_and_may_change_on_resume():
    default, dask = _cfg(), _cfg({"kind": "dask", "workers": 2})
    assert default.config_hash() == dask.config_hash()
    assert evaluation_config(default) == evaluation_config(dask)
    assert default.effective_run_key() == dask.effective_run_key()
    changed = diff_configs(default.model_dump(mode="json"), dask.model_dump(mode="json"), set(ALLOWED_CHANGES))
    assert changed == []
    assert _cfg(torch_threads=2).config_hash() != default.config_hash()  # other runtime keys still count


def test_gpu_workers_and_resources():
    spec = _cfg({"kind": "dask", "gpus": 2}, device="cuda").runtime.task_runner
    assert spec.gpus == ["0", "1"] and spec.worker_count() == 2 and spec.resources("cuda") == {"GPU": 1.0}
    assert _cfg({"kind": "dask"}).runtime.task_runner.resources("cpu") == {}
    custom = _cfg({"kind": "dask", "candidate_resources": {"slot": 1}}).runtime.task_runner
    assert custom.resources("cpu") == {"slot": 1}
    assert _cfg({"kind": "dask", "address": "tcp://h:1"}, device="cuda").runtime.task_runner.resources("cuda") == {"GPU": 1.0}


def test_candidates_per_task_batches_and_round_trips():
    one = _cfg().runtime.task_runner
    assert [list(b) for b in one.batches(3, slots=2)] == [[0], [1], [2]]
    fixed = _cfg({"candidates_per_task": 3}).runtime.task_runner  # also with the default runner
    assert [list(b) for b in fixed.batches(7, slots=None)] == [[0, 1, 2], [3, 4, 5], [6]]
    auto = _cfg({"kind": "dask", "workers": 2, "candidates_per_task": "auto"})
    assert [list(b) for b in auto.runtime.task_runner.batches(5, slots=2)] == [[0, 1, 2], [3, 4]]
    assert [list(b) for b in auto.runtime.task_runner.batches(5, slots=1)] == [[0, 1, 2, 3, 4]]
    assert auto.runtime.task_runner.batches(0, slots=2) == []
    again = parse_run_config(_cfg({"candidates_per_task": 3}).model_dump(mode="json"))
    assert again.runtime.task_runner.candidates_per_task == 3
    assert again.config_hash() == _cfg().config_hash()  # how candidates are grouped never changes results


@pytest.mark.parametrize("runner, runtime, message", [
    ({"candidates_per_task": 0}, {}, "candidates_per_task must be at least 1"),
    ({"candidates_per_task": "all"}, {}, "candidates_per_task"),
    ({"kind": "default", "workers": 2}, {}, "workers only applies to kind: dask"),
    ({"kind": "dask", "address": "tcp://h:1", "workers": 2}, {}, "address uses an existing Dask cluster"),
    ({"kind": "dask", "gpus": [0, 1], "workers": 3}, {}, "gpus lists 2 GPUs"),
    ({"kind": "dask", "gpus": [0, 0]}, {}, "lists a GPU twice"),
    ({"kind": "dask"}, {"device": "cuda"}, "runtime.task_runner.gpus is not set"),
    ({"kind": "ray"}, {}, "runtime.task_runner.kind"),
    ({"kind": "dask", "workers": 0}, {}, "workers"),
])
def test_bad_runner_configs_fail_with_one_clear_error(runner, runtime, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        _cfg(runner, **runtime)


def test_prefect_yaml_deployments_point_at_real_flows():
    spec = yaml.safe_load((REPO / "infra/prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert set(deployments) == {"evolve", "evolve-gpu", "resume", "publish", "publish-run", "demo"}
    for d in deployments.values():
        path, func = d["entrypoint"].split(":")
        assert re.search(rf"^def {func}\(", (REPO / path).read_text(), re.M), d["entrypoint"]
        assert d["work_pool"]["name"] in {"evomerge-local", "evomerge-gpu"}
    evolve = deployments["evolve"]
    assert evolve["schedules"][0]["cron"] and evolve["schedules"][0]["active"] is False
    (trigger,) = evolve["triggers"]
    assert trigger["expect"] == ["evomerge.source.revision-registered"]
    assert trigger["parameters"]["config_path"] == "{{ event.payload.config_path }}"
    assert 'SOURCE_REVISION_EVENT = "evomerge.source.revision-registered"' in (REPO / "flows/deployments.py").read_text()
    gpu = deployments["evolve-gpu"]["work_pool"]["job_variables"]
    assert gpu["gpus"] == 1 and gpu["tolerations"][0]["key"] == "nvidia.com/gpu" and gpu["node_selector"]
    assert deployments["publish"]["concurrency_limit"]["limit"] == 1


def test_k8s_job_template_requests_gpus_and_declares_every_variable():
    template = json.loads((REPO / "infra/k8s-gpu-job-template.json").read_text())
    variables = template["variables"]["properties"]
    assert {"gpus", "node_selector", "tolerations", "image"} <= set(variables)
    used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", json.dumps(template["job_configuration"])))
    assert used <= set(variables), used - set(variables)
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == "{{ node_selector }}" and pod["tolerations"] == "{{ tolerations }}"
    resources = pod["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == "{{ gpus }}" == resources["requests"]["nvidia.com/gpu"]
