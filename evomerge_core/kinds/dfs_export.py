"""Materialise a DFS recipe as a standard model of A's family (plain `from_pretrained`).

Hop k becomes decoder layer k: a copy of its source layer's tensors, renamed
``model.layers.{src}.`` -> ``model.layers.{k}.``. The scales are folded exactly into weights
(docs/dfs.md): hop k+1's scale multiplies hop k's output projection (`mlp.down_proj` weight
and bias), and hop 0's scale multiplies the embedding matrix. When A ties its embeddings to
the LM head and hop 0's scale is not 1, the output is untied (``tie_word_embeddings: false``
and an explicit, unscaled ``lm_head.weight``), so the head stays A's.

Everything else (embeddings, final norm, head, tokenizer, generation config) comes from A;
``num_hidden_layers`` becomes the number of hops and per-layer config lists (``layer_types``)
follow the hops. The directory is built in a temporary sibling and renamed at the end
(`io.model_dir.ModelDirWriter`); the recipe is `recipe.yaml`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from evomerge_core.kinds.dfs_model import scale_tensor
from evomerge_core.sources.decoder_families import DecoderFamily, check_pair
from evomerge_core.errors import MergeError, SourceError
from evomerge_core.io.dtypes import parse_dtype
from evomerge_core.io.model_dir import RECIPE_FILE, ModelDirWriter, check_target, set_config_dtype
from evomerge_core.io.model_files import TOKENIZER_FILES, LazyModelReader, PlannedTensor, read_config
from evomerge_core.spaces.dfs import DFSRecipe

__all__ = ["RECIPE_FILE", "materialise_dfs"]  # RECIPE_FILE: the recipe's name, io.model_dir's


def _layer_tensors(reader: LazyModelReader, prefix: str, layer: int) -> list[str]:
    """Suffixes of the tensors of one decoder layer, in file order."""
    head = f"{prefix}{layer}."
    return [n[len(head) :] for n in reader.names() if n.startswith(head)]


def _out_dtype(name: str | None, source: torch.dtype) -> torch.dtype:
    if name:
        return parse_dtype(name)
    return source


def _auto_layer_types(path: Path, n: int) -> list[str] | None:
    """The per-layer attention types transformers derives for a config (None when it has none)."""
    from transformers import AutoConfig  # deferred: transformers is heavy

    types = getattr(AutoConfig.from_pretrained(path), "layer_types", None)
    return list(types) if types and len(types) == n else None


def materialise_dfs(
    recipe: DFSRecipe,
    sources: Mapping[str, str | Path],
    out_dir: str | Path,
    *,
    dtype: str | None = None,
    overwrite: bool = False,
    shard_size: int = 5 * 10**9,
) -> Path:
    """Write `recipe` as a loadable model directory; `sources` maps the recipe's model
    references to local directories. Returns `out_dir`."""
    out_dir = Path(out_dir)
    for ref in (recipe.model_a, recipe.model_b):
        if ref not in sources:
            raise SourceError(f"DFS model {ref!r} was not resolved to a directory; pass it in sources")
    dir_a, dir_b = Path(sources[recipe.model_a]), Path(sources[recipe.model_b])
    cfg_a, cfg_b = read_config(dir_a), read_config(dir_b)
    family = check_pair(cfg_a, cfg_b, name_a=recipe.model_a, name_b=recipe.model_b)
    la, lb = int(cfg_a["num_hidden_layers"]), int(cfg_b["num_hidden_layers"])
    recipe.check_layers(la, lb)
    check_target(out_dir, overwrite=overwrite, sources={recipe.model_a: dir_a, recipe.model_b: dir_b})
    reader_a = LazyModelReader(dir_a)
    readers = {"a": reader_a, "b": reader_a if dir_a.resolve() == dir_b.resolve() else LazyModelReader(dir_b)}
    plan, sources_of = _plan(recipe, family, readers, dtype, la, lb)
    config = _config(recipe, cfg_a, dir_a, dir_b, la, lb, plan, family)

    with ModelDirWriter(out_dir) as out:
        writer = out.shards(plan, shard_size)
        for item in plan:
            reader, src_name, scale = sources_of[item.name]
            tensor = reader.get(src_name).to(item.dtype)
            if scale != 1.0:
                tensor = scale_tensor(tensor, scale)
            writer.write(item.name, tensor)
        out.write_config(config)
        out.copy_files(dir_a, ["generation_config.json"])
        out.copy_files(dir_a, TOKENIZER_FILES)
        out.write_recipe(recipe.to_yaml())
        out.write_sources({recipe.model_a: dir_a, recipe.model_b: dir_b})  # Hub commits, for the card
        out.commit()
    return out_dir


def _plan(
    recipe: DFSRecipe, family: DecoderFamily, readers: dict[str, LazyModelReader], dtype: str | None, la: int, lb: int
) -> tuple[list[PlannedTensor], dict[str, tuple[LazyModelReader, str, float]]]:
    """Output tensors in write order, and for each: (reader, source tensor name, scale)."""
    reader_a = readers["a"]
    prefix = family.layers_prefix
    ref_layer = {s: reader_a.tensors[f"{prefix}0.{s}"] for s in _layer_tensors(reader_a, prefix, 0)}
    plan: list[PlannedTensor] = []
    sources_of: dict[str, tuple[LazyModelReader, str, float]] = {}

    def add(name: str, reader: LazyModelReader, src: str, scale: float) -> None:
        info = reader.tensors[src]
        out = _out_dtype(dtype, info.dtype) if info.dtype.is_floating_point else info.dtype
        plan.append(PlannedTensor(name, out, tuple(info.shape)))
        sources_of[name] = (reader, src, scale)

    outside = [n for n in reader_a.names() if not n.startswith(prefix)]
    if family.embed_tensor not in reader_a:
        raise SourceError(f"model {recipe.model_a!r} has no {family.embed_tensor}; it is not a {family.model_type} checkpoint DFS can export")
    first_scale = recipe.path[0].scale
    add(family.embed_tensor, reader_a, family.embed_tensor, first_scale)
    for k, hop in enumerate(recipe.path):
        reader = readers[hop.model]
        suffixes = _layer_tensors(reader, prefix, hop.layer)
        if set(suffixes) != set(ref_layer):
            raise SourceError(f"layer {hop.layer} of model {hop.model.upper()} has tensors {sorted(suffixes)} "
                              f"but A's layers have {sorted(ref_layer)}; the models' layers differ")
        nxt = recipe.path[k + 1].scale if k + 1 < len(recipe.path) else 1.0
        for s in suffixes:
            src = f"{prefix}{hop.layer}.{s}"
            if tuple(reader.tensors[src].shape) != tuple(ref_layer[s].shape):
                raise SourceError(f"tensor {src} of model {hop.model.upper()} has shape {list(reader.tensors[src].shape)} "
                                  f"but A's has {list(ref_layer[s].shape)}; the models' layers differ")
            add(f"{prefix}{k}.{s}", reader, src, nxt if s in family.output_tensors else 1.0)
    for name in outside:
        if name != family.embed_tensor:
            add(name, reader_a, name, 1.0)
    if first_scale != 1.0 and family.head_tensor not in sources_of:
        # Tied embeddings: the head must stay A's unscaled matrix, so write it explicitly.
        add(family.head_tensor, reader_a, family.embed_tensor, 1.0)
    return plan, sources_of


def _config(recipe: DFSRecipe, cfg_a: dict, dir_a: Path, dir_b: Path, la: int, lb: int, plan: list[PlannedTensor], family: DecoderFamily) -> dict:
    """A's config with the path's depth, per-hop layer types and (un)tied embeddings."""
    config = dict(cfg_a)
    n = len(recipe.path)
    config["num_hidden_layers"] = n
    types_a = _auto_layer_types(dir_a, la)
    if types_a is not None:
        types_b = _auto_layer_types(dir_b, lb)
        if types_b is None:
            raise MergeError("model A has per-layer attention types but model B has none; the models cannot be combined")
        config["layer_types"] = [(types_a if h.model == "a" else types_b)[h.layer] for h in recipe.path]
    if family.head_tensor in {p.name for p in plan}:
        config["tie_word_embeddings"] = False
    return set_config_dtype(config, next(p.dtype for p in plan if p.name == family.embed_tensor))
