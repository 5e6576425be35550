"""One resident model per worker process: source weights are read once into memory, and each
candidate recipe is merged tensor by tensor *in place* into the same model (no model reload,
no state-dict copy: peak extra memory is one merged tensor).

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
from typing import Any

import torch

from evomerge_core.errors import MergeError
from evomerge_core.io import LazyModelReader
from evomerge_core.merge.engine import merge_tensor, parse_dtype
from evomerge_core.merge.recipe import MergeRecipe


class ResidentModel:
    """Source state dicts in memory + one model that candidates are merged into."""

    def __init__(self, sources: Mapping[str, str | Path], *, reference: str, num_layers: int,
                 dtype: str = "float32", device: str = "cpu", tokenizer_source: str | None = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

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

    @torch.no_grad()
    def apply(self, recipe: MergeRecipe) -> None:
        """Merge `recipe` into the resident model in place (caller holds `lock`)."""
        self.current = None
        for name, target in self._targets.items():
            tensors = {ref: sd[name] for ref, sd in self.state_dicts.items()}
            merged = merge_tensor(recipe, name, tensors, num_layers=self.num_layers)
            if not bool(torch.isfinite(merged).all()):
                raise MergeError(f"the merge produced non-finite values in tensor {name}")
            if tuple(merged.shape) != tuple(target.shape):
                raise MergeError(f"merged tensor {name} has shape {list(merged.shape)}, the model expects {list(target.shape)}")
            target.data.copy_(merged.to(dtype=target.dtype, device=target.device))
        self.current = recipe_hash(recipe)


def recipe_hash(recipe: MergeRecipe) -> str:
    """A stable hash of a recipe."""
    return hashlib.sha256(json.dumps(recipe.to_yaml_dict(), sort_keys=True).encode()).hexdigest()


# One resident model per process; a new key evicts the old one (only one fits in memory).
_CACHE: dict[tuple[Any, ...], ResidentModel] = {}
_CACHE_LOCK = threading.Lock()


def get_resident(sources: Mapping[str, str | Path], *, reference: str, num_layers: int,
                 dtype: str = "float32", device: str = "cpu", tokenizer_source: str | None = None) -> ResidentModel:
    """The process-wide resident model for these sources and settings (loaded on first use)."""
    key = (tuple(sorted((r, str(p)) for r, p in sources.items())), reference, num_layers, dtype, device, tokenizer_source)
    with _CACHE_LOCK:
        found = _CACHE.get(key)
        if found is None:
            _CACHE.clear()
            found = ResidentModel(sources, reference=reference, num_layers=num_layers, dtype=dtype,
                                  device=device, tokenizer_source=tokenizer_source)
            _CACHE[key] = found
        return found


def clear_resident_cache() -> None:
    """Drop the cached resident model (frees its memory)."""
    with _CACHE_LOCK:
        _CACHE.clear()
