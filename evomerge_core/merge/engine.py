"""The merge engine: apply a recipe tensor by tensor, in memory or streamed to disk.

Streaming (`merge_to_dir`) takes one tensor per source at a time as a view of the mapped
source file (no copy), merges it chunk by chunk in float32 (`kernels`) straight into the
output staging buffer in the output dtype, writes it (O_DIRECT where possible, `fastio`) and
drops the source pages again, so memory stays near one tensor per source. The output
directory is built in a temporary sibling and renamed at the end.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Mapping

import torch
import yaml
from tqdm import tqdm

from evomerge_core.sources.architectures import is_vocab_tensor, layer_index
from evomerge_core.errors import MergeError
from evomerge_core.io.dtypes import parse_dtype
from evomerge_core.io.model_dir import ModelDirWriter, check_target, set_config_dtype
from evomerge_core.io.model_files import TOKENIZER_FILES, PlannedTensor
from evomerge_core.merge.fastio import DirectShardedWriter, MappedModel
from evomerge_core.merge.kernels import cpu_parallelism
from evomerge_core.merge.workspace import release_workspace
from evomerge_core.merge.moe import check_expert_merge
from evomerge_core.merge.params import MergePlan, plan_recipe, resolve_tensor_params, unmatched_filters
from evomerge_core.merge.recipe import MergeRecipe
from evomerge_core.merge.sparsify import tensor_seed
from evomerge_core.sources.resolve import validate_sources

def tensor_generator(seed: int, tensor_name: str, model_index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator seeded with `tensor_seed` (for callers that want torch random draws)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(tensor_seed(seed, tensor_name, model_index))
    return gen


def _merge_planned(plan: MergePlan, tensor_name: str, tensors: Mapping[str, torch.Tensor], num_layers: int,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Merge one tensor from inputs of any float dtype into `out` (default: a new float32)."""
    method = plan.method
    needed = ([plan.base] if plan.base else []) + list(plan.inputs)
    missing = [m for m in needed if m not in tensors]
    if missing:
        raise MergeError(f"tensor {tensor_name}: no tensor given for model {missing[0]!r}")
    ref = tensors[plan.reference] if plan.reference in tensors else tensors[needed[0]]
    ref_shape = tuple(ref.shape)
    rows = None
    for model in needed:
        shape = tuple(tensors[model].shape)
        if shape == ref_shape:
            continue
        if is_vocab_tensor(tensor_name) and len(shape) == len(ref_shape) and shape[1:] == ref_shape[1:]:
            rows = min(rows if rows is not None else ref_shape[0], shape[0])
            continue
        raise MergeError(
            f"tensor {tensor_name} has shape {list(shape)} in model {model!r} but {list(ref_shape)} in {plan.reference!r}; "
            "the models cannot be merged"
        )
    global_params, model_params = resolve_tensor_params(plan, tensor_name, num_layers)
    if out is None:
        out = torch.empty(ref_shape, dtype=torch.float32, device=ref.device)

    def rows_of(model: str) -> torch.Tensor:
        t = tensors[model]
        return t[:rows] if rows is not None else t

    seeds: list[int | None] = [None] * len(plan.inputs)
    if method.stochastic:
        seeds = [tensor_seed(plan.recipe.seed, tensor_name, i) for i in range(len(plan.inputs))]
    method(
        [rows_of(m) for m in plan.inputs],
        base=rows_of(plan.base) if plan.base else None,
        model_params=model_params,
        params=global_params,
        generators=seeds,
        out=out[:rows] if rows is not None else out,
    )
    if rows is not None:
        # Vocabulary rule: shared rows merged, the reference model's extra rows kept as they are.
        out[rows:].copy_(ref[rows:])
    return out


def merge_tensor(recipe: MergeRecipe, tensor_name: str, tensors: Mapping[str, torch.Tensor], *, num_layers: int,
                 reference: str | None = None) -> torch.Tensor:
    """Merge one tensor. `tensors` (any float dtype) is keyed by the recipe's model references
    (base included when the method has one). Returns float32; deterministic for DARE given
    `recipe.seed`.
    `reference` overrides the model whose shape (and extra vocabulary rows) the result takes
    (default: the base, else the first model); it must be a key of `tensors`."""
    plan = plan_recipe(recipe)
    if reference is not None and reference != plan.reference:
        if reference not in tensors:
            raise MergeError(f"tensor {tensor_name}: no tensor given for reference model {reference!r}")
        plan = dataclasses.replace(plan, reference=reference)
    return _merge_planned(plan, tensor_name, tensors, num_layers)


def merge_state_dicts(
    recipe: MergeRecipe, state_dicts: Mapping[str, Mapping[str, torch.Tensor]], *, num_layers: int
) -> dict[str, torch.Tensor]:
    """Merge whole in-memory state dicts (keyed by model reference); tensor names and order
    come from the reference model (base, else the first listed)."""
    plan = plan_recipe(recipe)
    if plan.reference not in state_dicts:
        raise MergeError(f"no state dict given for model {plan.reference!r}")
    out = {}
    for name in state_dicts[plan.reference]:
        try:
            tensors = {m: sd[name] for m, sd in state_dicts.items()}
        except KeyError:
            bad = next(m for m, sd in state_dicts.items() if name not in sd)
            raise MergeError(f"tensor {name} is missing from model {bad!r}") from None
        out[name] = _merge_planned(plan, name, tensors, num_layers)
    return out


def check_device(device: str) -> str:
    """`device` if a merge can run there (cpu, or cuda[:N] when CUDA is available), else MergeError."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise MergeError(f"unknown device {device!r}; use --device cpu or --device cuda[:N]") from None
    if parsed.type == "cpu":
        return device
    if parsed.type != "cuda":
        raise MergeError(f"device {device!r} is not supported for merging; use --device cpu or --device cuda[:N]")
    if not torch.cuda.is_available():
        raise MergeError(f"--device {device} was requested but no CUDA device is available; use --device cpu")
    if parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise MergeError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s); use cuda:0 .. "
                         f"cuda:{torch.cuda.device_count() - 1}")
    return device


def check_shard_size(shard_size: int) -> int:
    """`shard_size` if it is a positive number of bytes, else MergeError."""
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size <= 0:
        raise MergeError(f"--shard-size must be a positive number of bytes (e.g. 5000000000), got {shard_size!r}")
    return shard_size


def _out_dtype(recipe: MergeRecipe, dtype: str | None, source_dtype: torch.dtype) -> torch.dtype:
    for name in (dtype, recipe.out_dtype, recipe.dtype):
        if name:
            return parse_dtype(name)
    return source_dtype if source_dtype.is_floating_point else torch.float32


def merge_to_dir(
    recipe: MergeRecipe,
    sources: Mapping[str, Path],
    out_dir: Path,
    *,
    dtype: str | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    shard_size: int = 5 * 10**9,
    progress: bool = True,
    notes: list[str] | None = None,
) -> Path:
    """Merge resolved sources into a loadable Hugging Face model directory, atomically.

    Config comes from the base (else first) model, tokenizer files from `tokenizer_source`
    (else base, else first), plus generation_config.json and `evomerge_sources.json` (the Hub
    commit of every Hub source). Everything is checked before anything is created; `OUT_DIR`
    may not be, contain or lie inside a source. Notes on what was done about a missing
    tokenizer or differing vocabularies are appended to `notes`. Returns `out_dir`.
    """
    out_dir = Path(out_dir)
    plan = plan_recipe(recipe)
    check_device(device)
    check_shard_size(shard_size)
    needed = ([plan.base] if plan.base else []) + list(plan.inputs)
    if plan.reference not in needed:
        needed.insert(0, plan.reference)
    missing = [m for m in needed if m not in sources]
    if missing:
        raise MergeError(f"model {missing[0]!r} of the recipe was not resolved to a directory")
    check_target(out_dir, overwrite=overwrite, sources={m: Path(sources[m]) for m in needed})
    tok_ref = tokenizer_ref(recipe, plan)
    info = validate_sources({m: Path(sources[m]) for m in needed}, base=plan.reference)
    check_filters(recipe, list(info.tensor_shapes))
    check_expert_merge(plan, info.tensor_shapes, info.num_layers)
    merge_notes = _tokenizer_notes(recipe, tok_ref, Path(sources[tok_ref])) + _vocab_notes(info)
    if notes is not None:
        notes.extend(merge_notes)
    first_dtype = next(iter(info.tensor_dtypes.values()))
    out_dtype = _out_dtype(recipe, dtype, first_dtype)  # type: ignore[arg-type]
    planned = [
        PlannedTensor(n, out_dtype if info.tensor_dtypes[n].is_floating_point else info.tensor_dtypes[n], shape)  # type: ignore[union-attr]
        for n, shape in info.tensor_shapes.items()
    ]
    on_cpu = torch.device(device).type == "cpu"
    models: dict[str, MappedModel] = {}
    with ModelDirWriter(out_dir) as out:
        try:
            for m in needed:
                models[m] = MappedModel(Path(sources[m]))
            writer = out.shards(planned, shard_size, DirectShardedWriter)
            with cpu_parallelism(None if on_cpu else 1):
                _stream(plan, planned, info, models, writer, device, on_cpu, progress)
            _write_aux(recipe, plan, sources, out, out_dtype)
            out.commit()
        finally:
            for src in models.values():
                src.close()
            release_workspace()
    return out_dir


def _stream(plan: MergePlan, planned: list[PlannedTensor], info, models: Mapping[str, MappedModel],
            writer: DirectShardedWriter, device: str, on_cpu: bool, progress: bool) -> None:
    """Merge every planned tensor into the writer, in order."""
    bar = _progress(len(planned), progress)
    for pos, item in enumerate(planned):
        if pos + 1 < len(planned):
            for src in models.values():
                src.prefetch(planned[pos + 1].name)
        dst = writer.buffer(item.name)
        if info.tensor_dtypes[item.name].is_floating_point:  # type: ignore[union-attr]
            # Source-dtype views of the mapped files; the kernels convert chunk by chunk.
            tensors = {m: src.get(item.name) for m, src in models.items()}
            if on_cpu:
                _merge_planned(plan, item.name, tensors, info.num_layers, out=dst)
            else:
                tensors = {m: t.to(device) for m, t in tensors.items()}
                merged = _merge_planned(plan, item.name, tensors, info.num_layers,
                                        out=torch.empty(dst.shape, dtype=dst.dtype, device=device))
                dst.copy_(merged)
                del merged
        else:  # integer buffers (rare) are taken from the reference model unchanged
            tensors = {}
            dst.copy_(models[plan.reference].get(item.name))
        writer.commit(item.name)
        del tensors, dst
        for src in models.values():
            src.release(item.name)
        bar.update(1)
    bar.close()


def tokenizer_ref(recipe: MergeRecipe, plan: MergePlan) -> str:
    """The model whose tokenizer files the output gets (tokenizer_source, else the reference)."""
    ref = recipe.tokenizer_source if recipe.tokenizer_source not in (None, "base") else plan.reference
    if ref == "union":
        raise MergeError("tokenizer_source: union is not supported; use base or one model reference")
    if ref not in plan.inputs and ref != plan.base and ref != plan.reference:
        raise MergeError(f"tokenizer_source {ref!r} is not one of the recipe's models; use base or a listed model")
    return ref


def check_filters(recipe: MergeRecipe, tensor_names: list[str]) -> None:
    """MergeError for a parameter `filter` that matches no tensor of the models (a typo, or
    another naming, would otherwise leave the parameter silently unused)."""
    unmatched = unmatched_filters(recipe, tensor_names)
    if unmatched:
        where, name, flt = unmatched[0]
        example = next((t for t in tensor_names if layer_index(t) is not None), tensor_names[0] if tensor_names else "")
        raise MergeError(
            f"filter {flt!r} of parameter {name!r} ({where}) matches no tensor of the models (their names look like "
            f"{example}); use a substring of the tensor names, or remove that entry"
        )


def _tokenizer_notes(recipe: MergeRecipe, tok_ref: str, tok_dir: Path) -> list[str]:
    """A note when the tokenizer source has no tokenizer files (MergeError when it was named)."""
    if any((tok_dir / f).is_file() for f in TOKENIZER_FILES):
        return []
    if recipe.tokenizer_source not in (None, "base"):
        raise MergeError(f"tokenizer_source {tok_ref!r} has no tokenizer files; name a model that has them")
    return [f"note: {tok_ref!r}, the model the output takes its tokenizer from, has no tokenizer files, so the "
            "merged model has none; set tokenizer_source: <model> in the config to copy one from another source"]


def _vocab_notes(info) -> list[str]:
    """A note when the sources' vocabularies differ (what the vocabulary rule did about it)."""
    sizes = {m: s for m, s in info.vocab_sizes.items() if s is not None}
    if len(set(sizes.values())) <= 1:
        return []
    ref = info.reference
    listing = ", ".join(f"{m!r}: {s}" for m, s in sizes.items())
    return [f"note: the vocabulary sizes differ ({listing}); the output keeps the vocabulary of {ref!r}: the "
            f"{min(sizes.values())} rows all models share are merged, {ref!r}'s other rows are copied unchanged "
            "and other models' extra rows are dropped (docs/merging.md, vocabulary rule)"]


def _write_aux(recipe: MergeRecipe, plan: MergePlan, sources: Mapping[str, Path], out: ModelDirWriter, out_dtype: torch.dtype) -> None:
    ref_dir = Path(sources[plan.reference])
    out.write_config(set_config_dtype(json.loads((ref_dir / "config.json").read_text()), out_dtype))
    out.copy_files(ref_dir, ["generation_config.json"])
    out.copy_files(Path(sources[tokenizer_ref(recipe, plan)]), TOKENIZER_FILES)
    out.write_recipe(yaml.safe_dump(recipe.to_yaml_dict(), sort_keys=False))
    out.write_sources({m: Path(p) for m, p in sources.items() if m in recipe.model_names()})


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    return tqdm(total=total, desc="merging", unit="tensor", file=sys.stderr)
