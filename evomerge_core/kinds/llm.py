"""Run kind ``llm``: PS over language models. Each candidate recipe is merged in place into
the worker's `ResidentModel`; the best is merged to ``best/`` with `recipe.yaml` and
`mergekit.yaml` beside it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from evomerge_core.config.schema import RunConfig
from evomerge_core.errors import SourceError
from evomerge_core.io.model_files import LazyModelReader, read_config
from evomerge_core.kinds.base import RUN_KINDS, publish_best
from evomerge_core.kinds.resident import ResidentModel, get_resident
from evomerge_core.merge.engine import merge_to_dir
from evomerge_core.merge.mergekit_yaml import to_mergekit_yaml
from evomerge_core.runs.store import RunStore
from evomerge_core.sources.architectures import architecture_name, num_hidden_layers
from evomerge_core.sources.resolve import resolve_run_source, validate_sources
from evomerge_core.spaces import PSSpace


def reference_of(config: RunConfig) -> str:
    """The source whose model candidates are merged into: the base, else the first source."""
    return config.base or config.sources[0].model


class LLMKind:
    """PS over language models (`RunKind`)."""

    name = "llm"

    def resolve_sources(self, config: RunConfig) -> dict[str, Any]:
        paths = {s.model: resolve_run_source(s) for s in config.sources}
        info = validate_sources(paths, base=config.base)
        return {"paths": {k: str(v) for k, v in paths.items()}, "num_layers": info.num_layers,
                "architecture": info.architecture}

    def num_layers(self, config: RunConfig, paths: Mapping[str, str]) -> int:
        return num_hidden_layers(read_config(Path(paths[reference_of(config)])))

    def build_space(self, config: RunConfig, paths: Mapping[str, str]) -> PSSpace:
        return PSSpace.from_config(config, num_layers=self.num_layers(config, paths))

    def open_model(self, config: RunConfig, paths: Mapping[str, str]) -> ResidentModel:
        return get_resident(paths, reference=reference_of(config), num_layers=self.num_layers(config, paths),
                            dtype=config.runtime.dtype, device=config.runtime.device)

    def check_local(self, config: RunConfig) -> None:
        return None

    def check_resolved(self, config: RunConfig, paths: Mapping[str, str]) -> None:
        reference = reference_of(config)
        check_in_place_names(Path(paths[reference]), reference)

    def check_stage_source(self, path: Path, ref: str) -> None:
        return None

    def materialise_best(self, config: RunConfig, paths: Mapping[str, str], num_layers: int,
                         genome: Sequence[float], store: RunStore) -> str:
        """Merge the genome's recipe in `output.dtype`, else the evaluation dtype, so the saved
        model reproduces the recorded fitness."""
        recipe = PSSpace.from_config(config, num_layers=num_layers).decode(genome)
        return publish_best(
            store,
            lambda out: merge_to_dir(recipe, {k: Path(v) for k, v in paths.items()}, out,
                                     dtype=config.output.dtype or config.runtime.dtype, progress=False),
            lambda: recipe_files(recipe))


def recipe_files(recipe: Any) -> dict[str, str]:
    """What a PS best model carries beside its weights: `recipe.yaml` and `mergekit.yaml`."""
    return {"recipe.yaml": yaml.safe_dump(recipe.to_yaml_dict(), sort_keys=False, allow_unicode=True),
            "mergekit.yaml": to_mergekit_yaml(recipe)}


def check_in_place_names(path: Path, ref: str) -> None:
    """Evolve merges each candidate into a resident model (`resident.ResidentModel`), matching
    stored tensor names to the loaded model's; refuse a family whose names differ, without
    loading any weights (the model is built on the meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM  # deferred: transformers is heavy

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


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""


RUN_KINDS.add("llm", LLMKind())
