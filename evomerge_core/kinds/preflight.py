"""The source checks `evomerge evolve` runs before anything is written or a flow starts.

They are the flow's own first steps (resolve and validate the sources, the checks
`evomerge merge` runs; build the search space), plus what a worker would otherwise find out
candidate by candidate: a model whose stored tensor names in-place merging cannot map (Mixtral
in transformers 5), and a device this machine does not have. Every failure is one
`SourceError`/`ConfigError` (exit code 2) naming the problem and the fix.
"""

from __future__ import annotations

import torch

from evomerge_core.config.schema import STAGE_REF, RunConfig
from evomerge_core.errors import ConfigError
from evomerge_core.kinds.base import run_kind
from evomerge_core.sources.resolve import resolve_run_source
from evomerge_core.spaces import build_space


def check_run_sources(config: RunConfig) -> None:
    """Resolve and check every source the run (or each of its stages) names directly; a
    stage's `@` references to an earlier stage's best model are checked when it exists."""
    if config.stages is None:
        _check_single(config)
        return
    _check_single(config.stage_config(0))
    for index in range(1, len(config.stages)):
        stage = config.stage_config(index)  # '@' references kept as they are
        kind = run_kind(stage)
        for spec in stage.sources:
            if not spec.model.startswith(STAGE_REF):
                kind.check_stage_source(resolve_run_source(spec), spec.model)


def _check_single(config: RunConfig) -> None:
    kind = run_kind(config)
    sources = kind.resolve_sources(config)  # SourceError: exactly what `evomerge merge` refuses
    build_space(config, num_layers=sources["num_layers"], num_layers_b=sources.get("num_layers_b"))
    kind.check_resolved(config, sources["paths"])


def check_device_present(config: RunConfig) -> None:
    """`runtime.device` must exist on this machine, unless candidates run on a Dask cluster
    given by address (its workers hold the device)."""
    device = config.runtime.device
    if device == "cpu" or config.runtime.task_runner.address is not None:
        return
    if device == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError("runtime.device is 'mps' but this machine has no Apple GPU (MPS); use device: cpu")
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    if index >= count:
        have = f"{count} CUDA GPU(s)" if count else "no CUDA GPU"
        raise ConfigError(f"runtime.device is {device!r} but this machine has {have}; use device: cpu, "
                          "run on a machine with that GPU, or set runtime.task_runner.address to a Dask cluster "
                          "whose workers have GPUs")
