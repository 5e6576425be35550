"""Where candidates are evaluated: the ``runtime.task_runner`` section of a run config.

``kind: default`` runs candidates in Prefect's default task runner (threads of the flow's
process; one resident model, candidates one at a time). ``kind: dask`` maps them over Dask
worker processes, each with its own resident model (`evomerge_core.kinds.resident`):

- a ``LocalCluster`` on this machine (``workers`` processes, ``threads_per_worker`` each);
- one worker per GPU (``gpus: [0, 1]``): each worker sees one GPU (``CUDA_VISIBLE_DEVICES``)
  and holds the Dask resource ``GPU: 1``;
- an existing scheduler (``address``), whose workers were started with ``--resources GPU=1``
  when the run uses a GPU.

The choice does not change results: it is left out of the config hash and the candidate-cache
keys, and a run may be resumed with another runner. This module is the config model only; the
Prefect/Dask objects are built in `evomerge.flows.runners`.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

LOOPBACK = "127.0.0.1"


class TaskRunnerConfig(BaseModel):
    """How candidates of a generation are spread over workers (see module docstring)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["default", "dask"] = "default"
    # Local cluster: worker processes (default 2) and threads each (1: one candidate at a time).
    workers: int | None = Field(default=None, ge=1)
    threads_per_worker: int = Field(default=1, ge=1)
    # Per worker; Dask pauses a worker above 80% of it and restarts it above 95%.
    memory_limit: str | None = None
    # One worker per listed GPU id (a "LocalCUDACluster"-style cluster without dask-cuda).
    gpus: list[str] | None = None
    # An existing Dask scheduler, e.g. tcp://10.0.0.5:8786 (no cluster is started).
    address: str | None = None
    # Dask resources each candidate needs; default {GPU: 1} with gpus or a CUDA device.
    candidate_resources: dict[str, float] | None = None
    # Candidates one Prefect task run evaluates: 1 (a task run per candidate: finest progress and
    # retries, right for real models) or more / "auto" (a generation split evenly over the
    # workers) where a candidate takes well under a second and Prefect's per-task-run work
    # (~0.1-0.3 s) would dominate. Each candidate is still stored in the run store when done.
    candidates_per_task: int | Literal["auto"] = Field(default=1)
    # Interface local schedulers and workers listen on; loopback unless you mean otherwise.
    host: str = LOOPBACK
    # "HOST:PORT" of the Dask dashboard of a local cluster; none by default.
    dashboard_address: str | None = None

    @field_validator("gpus", mode="before")
    @classmethod
    def _gpu_ids(cls, value: object) -> object:
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 1:
                raise ValueError("a GPU count must be at least 1")
            return [str(i) for i in range(value)]
        if isinstance(value, list):
            return [str(v) for v in value]
        return value

    @field_validator("candidates_per_task")
    @classmethod
    def _positive_batch(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("candidates_per_task must be at least 1 (or \"auto\")")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TaskRunnerConfig:
        # Checked on values, not on what was written: a dumped config (every field) must validate again.
        given = {name for name in type(self).model_fields if name != "kind" and getattr(self, name) is not None}
        if self.kind == "default":
            set_fields = sorted(given - {"threads_per_worker", "host", "candidates_per_task"})
            if set_fields:
                raise ValueError(f"{set_fields[0]} only applies to kind: dask; set kind: dask or remove it")
            return self
        if self.address is not None and ({"workers", "gpus", "memory_limit", "dashboard_address"} & given):
            raise ValueError("address uses an existing Dask cluster: remove workers, gpus, memory_limit and "
                             "dashboard_address (set them where that cluster is started)")
        if self.gpus is not None and self.workers is not None and self.workers != len(self.gpus):
            raise ValueError(f"gpus lists {len(self.gpus)} GPUs (one worker each) but workers is {self.workers}; "
                             "remove workers")
        if self.gpus is not None and len(set(self.gpus)) != len(self.gpus):
            raise ValueError("gpus lists a GPU twice; list each GPU id once")
        return self

    @property
    def is_default(self) -> bool:
        """True for Prefect's default task runner (candidates in the flow's process)."""
        return self.kind == "default"

    @property
    def is_unset(self) -> bool:
        """True when nothing of this section differs from its defaults."""
        return self == TaskRunnerConfig()

    def batches(self, count: int, slots: int | None) -> list[range]:
        """Split `count` candidates into the consecutive batches of one task run each;
        `slots` is how many candidates run at once (workers; None when unknown)."""
        if count <= 0:
            return []
        per_task = self.candidates_per_task
        size = math.ceil(count / max(slots or 1, 1)) if per_task == "auto" else per_task
        return [range(start, min(start + size, count)) for start in range(0, count, size)]

    def resources(self, device: str) -> dict[str, float]:
        """The Dask resources each candidate asks for (``{}``: none)."""
        if self.candidate_resources is not None:
            return dict(self.candidate_resources)
        if self.gpus is not None or device.startswith("cuda"):
            return {"GPU": 1.0}
        return {}

    def worker_count(self) -> int | None:
        """Workers of a local cluster (``None`` with an existing scheduler)."""
        if self.address is not None:
            return None
        if self.gpus is not None:
            return len(self.gpus)
        return self.workers or 2

    def check_device(self, device: str) -> None:
        """Raise ValueError for a local CPU-style cluster on a GPU device (workers would share one
        GPU and wait forever for a GPU resource none of them holds)."""
        if self.kind == "dask" and self.address is None and self.gpus is None and device.startswith("cuda"):
            raise ValueError("runtime.device is a GPU but runtime.task_runner.gpus is not set; list the GPUs "
                             "(gpus: [0, 1], one worker each) or use address: of a cluster whose workers hold GPU=1")
