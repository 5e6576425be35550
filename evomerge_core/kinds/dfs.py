"""The DFS parts of an evolve run: resolving and checking models A and B, and writing the
best path as a standard model directory (``best/``) with its recipe and lineage."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from evomerge_core.config.schema import RunConfig
from evomerge_core.runs.store import RunStore

LINEAGE_FILE = "lineage.yaml"


def resolve_dfs_sources(config: RunConfig) -> dict[str, Any]:
    """Resolve A and B to local dirs and check they can share a path (same layer shapes, a
    supported decoder family); SourceError naming the clash otherwise.

    Returns ``{"paths", "num_layers" (A's), "num_layers_b", "architecture"}``.
    """
    from evomerge_core.sources.decoder_families import check_pair
    from evomerge_core.io.model_files import read_config
    from evomerge_core.sources.resolve import resolve_run_source

    dfs = config.space.dfs
    assert dfs is not None
    paths = {s.model: resolve_run_source(s) for s in config.sources}
    cfg_a, cfg_b = read_config(paths[dfs.model_a]), read_config(paths[dfs.model_b])
    family = check_pair(cfg_a, cfg_b, name_a=dfs.model_a, name_b=dfs.model_b)
    return {
        "paths": {k: str(v) for k, v in paths.items()},
        "num_layers": int(cfg_a["num_hidden_layers"]),
        "num_layers_b": int(cfg_b["num_hidden_layers"]),
        "architecture": str((cfg_a.get("architectures") or [family.model_type])[0]),
    }


def source_lineage(ref: str, path: str | Path) -> dict[str, Any]:
    """Where a source came from: its reference, and for an evomerge result (a dir holding
    `recipe.yaml`) that recipe and its own lineage."""
    path = Path(path)
    entry: dict[str, Any] = {"model": ref}
    recipe = path / "recipe.yaml"
    if recipe.is_file():
        entry["recipe"] = yaml.safe_load(recipe.read_text())
        lineage = path / LINEAGE_FILE
        if lineage.is_file():
            entry["lineage"] = yaml.safe_load(lineage.read_text())
    return entry


def materialise_dfs_best(config: RunConfig, paths: Mapping[str, str], genome: Sequence[float], store: RunStore,
                         relpath: str = "best") -> str:
    """Write the genome's path as a standard model dir with `recipe.yaml` (the DFS recipe) and
    `lineage.yaml` (what A and B were), publish it at `relpath` and return its URL."""
    from evomerge_core.kinds.dfs_export import materialise_dfs
    from evomerge_core.spaces.dfs import DFSSpace

    dfs = config.space.dfs
    assert dfs is not None
    space = DFSSpace.from_sources(dfs, paths)
    recipe = space.decode(genome)
    recipe = recipe.model_copy(update={"dtype": config.output.dtype or config.runtime.dtype})
    lineage = {
        "kind": "dfs",
        "model_a": source_lineage(dfs.model_a, paths[dfs.model_a]),
        "model_b": source_lineage(dfs.model_b, paths[dfs.model_b]),
    }
    with tempfile.TemporaryDirectory(prefix="evomerge-best-") as tmp:
        out = materialise_dfs(recipe, paths, Path(tmp) / "best", dtype=config.output.dtype or config.runtime.dtype)
        (out / "recipe.yaml").write_text(recipe.to_yaml())
        (out / LINEAGE_FILE).write_text(yaml.safe_dump(lineage, sort_keys=False, allow_unicode=True))
        store.put_dir(out, relpath)
    return store.url(relpath)
