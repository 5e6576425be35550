"""One resident model per worker process: source weights are read once into memory, and each
candidate recipe is merged *in place* into the same model (no model reload, no state-dict
copy).

Two ways to merge, chosen once per worker:

- flat (models up to `FLAT_MAX_PARAMS` parameters, no tied weights, all sources the same
  shapes): the sources are kept as flat float32 vectors with the task vectors, DARE uniforms
  and TIES ranks cached once (`merge.flat`), and the model's weights are re-pointed to views of
  one flat buffer, so a candidate is a few dozen whole-model tensor ops written straight into
  the model;
- per tensor (bigger models): the chunked kernels (`merge.kernels`) write each tensor straight
  into its model weight; sources live on the model's device when they fit there.

Thread safety: Prefect's default task runner runs mapped tasks in threads of one process.
All of them share the cached `ResidentModel`; `ResidentModel.lock` must be held from `apply`
until scoring is done (``evaluate.CandidateEvaluator`` does this), so candidates on one worker
are evaluated one at a time. Parallelism comes from more worker processes (Dask), each with its
own resident model.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Mapping
from pathlib import Path

import torch

from evomerge_core.errors import MergeError
from evomerge_core.generation.engine.streaming import pin_sources, stream_sources
from evomerge_core.io.model_files import LazyModelReader
from evomerge_core.kinds.cache import cached_model
from evomerge_core.io.dtypes import parse_dtype
from evomerge_core.merge.engine import _merge_planned
from evomerge_core.merge.flat import FLAT_METHODS, FlatSources, all_finite, merge_flat
from evomerge_core.merge.kernels import cpu_parallelism
from evomerge_core.merge.params import plan_recipe
from evomerge_core.merge.recipe import MergeRecipe

# Flat merging keeps up to ~14 bytes per parameter and source (float32 copies, task vectors,
# DARE uniforms, TIES ranks); above this size the per-tensor kernels are as fast anyway.
FLAT_MAX_PARAMS = 16_000_000


class ResidentModel:
    """Source state dicts in memory + one model that candidates are merged into."""

    def __init__(self, sources: Mapping[str, str | Path], *, reference: str, num_layers: int,
                 dtype: str = "float32", device: str = "cpu", tokenizer_source: str | None = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer  # deferred: transformers is heavy

        if reference not in sources:
            raise MergeError(f"reference model {reference!r} is not among the sources")
        self.sources = {ref: Path(p) for ref, p in sources.items()}
        self.reference = reference
        self.num_layers = num_layers
        self.lock = threading.RLock()
        self.state_dicts: dict[str, dict[str, torch.Tensor]] = {}
        for ref, path in self.sources.items():
            reader = LazyModelReader(path)
            self.state_dicts[ref] = {name: reader.get(name) for name in reader.names()}
        self.model = AutoModelForCausalLM.from_pretrained(self.sources[reference], dtype=parse_dtype(dtype)).to(device)
        self.model.eval()
        tok_dir = self.sources.get(tokenizer_source or reference, self.sources[reference])
        self.tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        self._targets = self._map_targets()
        self.device = next(iter(self._targets.values())).device
        self.flat: FlatSources | None = self._build_flat()
        if self.flat is None:
            self._sources_to_device()
        self.current: str | None = None  # hash of the recipe now merged in

    def _map_targets(self) -> dict[str, torch.Tensor]:
        """Model tensor for each on-disk tensor name; every model weight must be covered."""
        model_sd = self.model.state_dict(keep_vars=True)
        names = list(self.state_dicts[self.reference])
        missing = [n for n in names if n not in model_sd]
        if missing:
            raise MergeError(
                f"tensor {missing[0]} of {self.reference!r} has no counterpart in the loaded model; "
                "this architecture's on-disk names differ from its in-memory names, which in-place merging does not support yet"
            )
        targets = {n: model_sd[n] for n in names}
        covered = {t.data_ptr() for t in targets.values()}
        uncovered = [n for n, t in model_sd.items() if n not in targets and t.data_ptr() not in covered]
        if uncovered:
            raise MergeError(f"model tensor {uncovered[0]} is not in the source weights; the sources cannot be merged in place")
        return targets

    def _build_flat(self) -> FlatSources | None:
        """Flat sources + the model's weights re-pointed into one buffer, when eligible."""
        names = list(self._targets)
        targets = list(self._targets.values())
        total = sum(t.numel() for t in targets)
        ref_sd = self.state_dicts[self.reference]
        eligible = (
            0 < total <= FLAT_MAX_PARAMS
            and len({t.data_ptr() for t in targets}) == len(targets)  # no tied weights
            and all(t.is_floating_point() and t.is_contiguous() for t in targets)
            and all(n in sd and tuple(sd[n].shape) == tuple(ref_sd[n].shape) and sd[n].is_floating_point()
                    for sd in self.state_dicts.values() for n in names)
        )
        dtype = targets[0].dtype
        if not eligible or any(t.dtype != dtype for t in targets):
            return None
        flat = FlatSources(self.state_dicts, names, device=self.device)
        self.state_dicts = {ref: flat.views(ref) for ref in self.state_dicts}  # no second copy
        self._flat_weights = torch.empty(flat.numel, dtype=dtype, device=self.device)
        for name, shape, (s, e) in zip(flat.names, flat.shapes, flat.segments()):
            target = self._targets[name]
            view = self._flat_weights[s:e].view(shape)
            view.copy_(target.data)
            target.data = view
        self._flat_scratch = None if dtype == torch.float32 else torch.empty(flat.numel, dtype=torch.float32, device=self.device)
        return flat

    def _sources_to_device(self) -> None:
        """Keep the sources on the model's device when they fit (half the free memory); else in
        pinned host memory, streamed to the device during each merge (`engine.streaming`)."""
        self.residency = "host"
        if self.device.type != "cuda":
            return
        need = sum(t.numel() * t.element_size() for sd in self.state_dicts.values() for t in sd.values())
        free, _ = torch.cuda.mem_get_info(self.device)
        if need < free // 2:
            self.state_dicts = {ref: {n: t.to(self.device) for n, t in sd.items()} for ref, sd in self.state_dicts.items()}
            self.residency = "device"
        else:
            self.state_dicts = pin_sources(self.state_dicts)
            self.residency = "pinned"

    @torch.no_grad()
    def apply(self, recipe: MergeRecipe) -> None:
        """Merge `recipe` into the resident model in place (caller holds `lock`)."""
        self.current = None
        plan = plan_recipe(recipe)
        if self.flat is not None and plan.method.name in FLAT_METHODS:
            self._apply_flat(plan)
        else:
            self._apply_per_tensor(plan)
        self.current = recipe_hash(recipe)

    def _apply_flat(self, plan) -> None:
        out = self._flat_weights if self._flat_scratch is None else self._flat_scratch
        merge_flat(self.flat, plan, self.num_layers, out)
        if not all_finite(out):
            bad = next(n for n, (s, e) in zip(self.flat.names, self.flat.segments()) if not all_finite(out[s:e]))
            raise MergeError(f"the merge produced non-finite values in tensor {bad}")
        if self._flat_scratch is not None:
            self._flat_weights.copy_(out)

    def _apply_per_tensor(self, plan) -> None:
        with cpu_parallelism(None if self.device.type == "cpu" else 1):
            if getattr(self, "residency", "host") == "pinned":  # copies of the next tensors overlap this merge
                for name, tensors in stream_sources(self.state_dicts, list(self._targets), self.device):
                    self._merge_into(plan, name, self._targets[name], tensors)
                return
            for name, target in self._targets.items():
                self._merge_into(plan, name, target)

    def _merge_into(self, plan, name: str, target: torch.Tensor, tensors: dict[str, torch.Tensor] | None = None) -> None:
        """One tensor of the per-tensor path, written straight into its weight when possible."""
        if tensors is None:
            tensors = {ref: sd[name] for ref, sd in self.state_dicts.items()}
        if any(t.device != target.device for t in tensors.values()):
            tensors = {ref: t.to(target.device) for ref, t in tensors.items()}
        direct = target.is_contiguous() and target.is_floating_point()
        merged = _merge_planned(plan, name, tensors, self.num_layers, out=target.data if direct else None)
        if tuple(merged.shape) != tuple(target.shape):
            raise MergeError(f"merged tensor {name} has shape {list(merged.shape)}, the model expects {list(target.shape)}")
        if not all_finite(merged):
            raise MergeError(f"the merge produced non-finite values in tensor {name}")
        if not direct:
            target.data.copy_(merged.to(dtype=target.dtype, device=target.device))


def recipe_hash(recipe: MergeRecipe) -> str:
    """A stable hash of a recipe."""
    return hashlib.sha256(json.dumps(recipe.to_yaml_dict(), sort_keys=True).encode()).hexdigest()


def get_resident(sources: Mapping[str, str | Path], *, reference: str, num_layers: int,
                 dtype: str = "float32", device: str = "cpu", tokenizer_source: str | None = None) -> ResidentModel:
    """The process-wide resident model for these sources and settings (loaded on first use;
    one model per worker, `kinds.cache`)."""
    key = ("llm", tuple(sorted((r, str(p)) for r, p in sources.items())), reference, num_layers, dtype, device,
           tokenizer_source)
    return cached_model(key, lambda: ResidentModel(sources, reference=reference, num_layers=num_layers, dtype=dtype,
                                                   device=device, tokenizer_source=tokenizer_source))
