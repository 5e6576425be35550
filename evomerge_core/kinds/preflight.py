"""The source checks `evomerge evolve` runs before anything is written or a flow starts.

They are the flow's own first steps (resolve and validate the sources, the checks
`evomerge merge` runs; build the search space), plus what a worker would otherwise find out
candidate by candidate: a model whose stored tensor names in-place merging cannot map (Mixtral
in transformers 5), and a device this machine does not have. Every failure is one
`SourceError`/`ConfigError` (exit code 2) naming the problem and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evomerge_core.config.schema import STAGE_REF, RunConfig
from evomerge_core.errors import ConfigError, SourceError


def check_run_sources(config: RunConfig) -> None:
    """Resolve and check every source the run (or each of its stages) names directly; a
    stage's `@` references to an earlier stage's best model are checked when it exists."""
    if config.stages is None:
        _check_single(config)
        return
    _check_single(config.stage_config(0))
    from evomerge_core.sources.resolve import resolve_run_source

    for index in range(1, len(config.stages)):
        stage = config.stage_config(index)  # '@' references kept as they are
        for spec in stage.sources:
            if not spec.model.startswith(STAGE_REF):
                path = resolve_run_source(spec)
                if stage.space.kind == "dfs":
                    from evomerge_core.sources.decoder_families import family_of
                    from evomerge_core.io.model_files import read_config

                    family_of(read_config(path), spec.model)


def _check_single(config: RunConfig) -> None:
    from evomerge_core.runs.search import resolve_run_sources
    from evomerge_core.spaces import build_space

    sources = resolve_run_sources(config)  # SourceError: exactly what `evomerge merge` refuses
    build_space(config, num_layers=sources["num_layers"], num_layers_b=sources.get("num_layers_b"))
    if config.space.kind == "ps" and config.vlm is None:
        reference = config.base or config.sources[0].model
        check_in_place_names(Path(sources["paths"][reference]), reference)


def check_in_place_names(path: Path, ref: str) -> None:
    """Evolve merges each candidate into a resident model (`resident.ResidentModel`), matching
    stored tensor names to the loaded model's; refuse a family whose names differ, without
    loading any weights (the model is built on the meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from evomerge_core.sources.architectures import architecture_name
    from evomerge_core.io.model_files import LazyModelReader, read_config

    arch = architecture_name(read_config(path))
    try:
        hf_config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config)
    except Exception as exc:  # an architecture transformers cannot build as a causal LM
        raise SourceError(f"model {ref!r} is a {arch}, which transformers cannot load as a causal LM "
                          f"({type(exc).__name__}: {_first_line(exc)}); evolve needs a decoder-only causal LM") from None
    loaded = set(model.state_dict())
    stored = LazyModelReader(path).tensors
    missing = [name for name in stored if name not in loaded]
    if missing:
        raise SourceError(
            f"model {ref!r} is a {arch} whose stored tensor names differ from the ones transformers loads "
            f"(e.g. {missing[0]}), so evolve cannot merge its candidates in place; evolve does not support this "
            "family yet (`evomerge merge` can merge it with a fixed recipe): choose models of another family "
            "(e.g. Llama, Mistral, Qwen2)")


def check_device_present(config: RunConfig) -> None:
    """`runtime.device` must exist on this machine, unless candidates run on a Dask cluster
    given by address (its workers hold the device)."""
    device = config.runtime.device
    if device == "cpu" or config.runtime.task_runner.address is not None:
        return
    import torch

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


def _first_line(exc: Exception) -> str:
    text: Any = str(exc).strip().splitlines()
    return text[0][:200] if text else ""
