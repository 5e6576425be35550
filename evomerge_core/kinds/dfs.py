"""Run kind ``dfs``: a layer path through models A and B. Candidates run as paths through the
worker's `DataflowModel` (no weights copied); the best path is written as a standard model
directory (``best/``) with its recipe and lineage. PS+DFS runs are chained stages of the
``llm`` and ``dfs`` kinds (`flows/chain.py`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from evomerge_core.config.dfs_space import DFSSpaceConfig
from evomerge_core.config.schema import RunConfig
from evomerge_core.io.model_dir import RECIPE_FILE, find_recipe
from evomerge_core.io.model_files import read_config
from evomerge_core.kinds.base import RUN_KINDS, publish_best
from evomerge_core.kinds.dfs_export import materialise_dfs
from evomerge_core.kinds.dfs_model import DataflowModel, get_dataflow_model
from evomerge_core.io.dtypes import parse_dtype
from evomerge_core.runs.store import RunStore
from evomerge_core.sources.decoder_families import check_pair, family_of
from evomerge_core.sources.resolve import resolve_run_source
from evomerge_core.spaces.dfs import DFSSpace

LINEAGE_FILE = "lineage.yaml"


class DataflowRunner:
    """The DFS counterpart of `ResidentModel`: the worker's `DataflowModel`, whose path is
    switched per candidate (no weights copied), and model A's tokenizer."""

    def __init__(self, dir_a: str, dir_b: str, *, dtype: str, device: str) -> None:
        from transformers import AutoTokenizer  # deferred: transformers is heavy

        self.model: DataflowModel = get_dataflow_model(dir_a, dir_b, dtype=parse_dtype(dtype), device=device)
        self.tokenizer = AutoTokenizer.from_pretrained(dir_a)
        self.lock = self.model.lock

    def apply(self, recipe: Any) -> None:
        """Switch to `recipe`'s path (caller holds `lock`)."""
        self.model.set_recipe(recipe)


class DFSKind:
    """DFS over models A and B (`RunKind`)."""

    name = "dfs"

    def resolve_sources(self, config: RunConfig) -> dict[str, Any]:
        """Resolve A and B to local dirs and check they can share a path (same layer shapes, a
        supported decoder family); SourceError naming the clash otherwise. A and B may differ
        in depth and vocabulary: ``num_layers`` is A's, ``num_layers_b`` B's."""
        dfs = _dfs(config)
        paths = {s.model: resolve_run_source(s) for s in config.sources}
        cfg_a, cfg_b = read_config(paths[dfs.model_a]), read_config(paths[dfs.model_b])
        family = check_pair(cfg_a, cfg_b, name_a=dfs.model_a, name_b=dfs.model_b)
        return {
            "paths": {k: str(v) for k, v in paths.items()},
            "num_layers": int(cfg_a["num_hidden_layers"]),
            "num_layers_b": int(cfg_b["num_hidden_layers"]),
            "architecture": str((cfg_a.get("architectures") or [family.model_type])[0]),
        }

    def num_layers(self, config: RunConfig, paths: Mapping[str, str]) -> int:
        return int(read_config(Path(paths[_dfs(config).model_a]))["num_hidden_layers"])

    def build_space(self, config: RunConfig, paths: Mapping[str, str]) -> DFSSpace:
        return DFSSpace.from_sources(_dfs(config), paths)

    def open_model(self, config: RunConfig, paths: Mapping[str, str]) -> DataflowRunner:
        dfs = _dfs(config)
        return DataflowRunner(paths[dfs.model_a], paths[dfs.model_b], dtype=config.runtime.dtype,
                              device=config.runtime.device)

    def check_local(self, config: RunConfig) -> None:
        """When A and B are local directories, check they can share a path (SourceError naming the clash)."""
        dfs = _dfs(config)
        dirs = [Path(ref.removeprefix("file://")).expanduser() for ref in (dfs.model_a, dfs.model_b)]
        if all((d / "config.json").is_file() for d in dirs):
            check_pair(read_config(dirs[0]), read_config(dirs[1]), name_a=f"space.dfs.model_a ({dfs.model_a})",
                       name_b=f"space.dfs.model_b ({dfs.model_b})")

    def check_resolved(self, config: RunConfig, paths: Mapping[str, str]) -> None:
        return None  # `resolve_sources` checked the pair

    def check_stage_source(self, path: Path, ref: str) -> None:
        family_of(read_config(path), ref)

    def materialise_best(self, config: RunConfig, paths: Mapping[str, str], num_layers: int,
                         genome: Sequence[float], store: RunStore, relpath: str = "best") -> str:
        """Write the genome's path as a standard model dir of A's family with `recipe.yaml`
        (the DFS recipe) and `lineage.yaml` (what A and B were), publish it at `relpath` and
        return its URL."""
        dfs = _dfs(config)
        dtype = config.output.dtype or config.runtime.dtype
        recipe = DFSSpace.from_sources(dfs, paths).decode(genome).model_copy(update={"dtype": dtype})
        lineage = {
            "kind": "dfs",
            "model_a": source_lineage(dfs.model_a, paths[dfs.model_a]),
            "model_b": source_lineage(dfs.model_b, paths[dfs.model_b]),
        }
        return publish_best(
            store, lambda out: materialise_dfs(recipe, paths, out, dtype=dtype),
            lambda: {RECIPE_FILE: recipe.to_yaml(),
                     LINEAGE_FILE: yaml.safe_dump(lineage, sort_keys=False, allow_unicode=True)},
            relpath)


def _dfs(config: RunConfig) -> DFSSpaceConfig:
    assert config.space.dfs is not None  # `run_kind` picks this kind only for a DFS space
    return config.space.dfs


def source_lineage(ref: str, path: str | Path) -> dict[str, Any]:
    """Where a source came from: its reference, and for an evomerge result (a dir holding
    `recipe.yaml`, or a recipe under an older name) that recipe and its own lineage."""
    path = Path(path)
    entry: dict[str, Any] = {"model": ref}
    recipe = find_recipe(path)
    if recipe is not None:
        entry["recipe"] = yaml.safe_load(recipe.read_text())
        lineage = path / LINEAGE_FILE
        if lineage.is_file():
            entry["lineage"] = yaml.safe_load(lineage.read_text())
    return entry


RUN_KINDS.add("dfs", DFSKind())
