"""Fitness items through `datasets`: a Hub dataset id or local jsonl/json/parquet/csv files,
renamed by a column mapping to ``prompt`` / ``answer`` (other columns are kept)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evomerge_core.config.schema import DatasetSpec, template_fields
from evomerge_core.errors import ConfigError

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _local_builder(spec: DatasetSpec) -> tuple[str, Any] | None:
    """(builder, data_files) for local files, or None for a Hub dataset id."""
    files = spec.data_files
    if files is None:
        path = Path(spec.path).expanduser()
        if not path.exists():
            if spec.path.startswith((".", "/", "~")) or Path(spec.path).suffix in _BUILDERS:
                raise ConfigError(f"dataset file {spec.path} does not exist; check fitness dataset path")
            return None
        if path.is_dir():
            return None  # a local dataset repository (load_dataset handles it)
        builder = _BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ConfigError(f"dataset file {spec.path} has an unsupported type; use .jsonl, .json, .parquet or .csv")
        if builder != "parquet" and not path.read_bytes()[:65536].strip():
            raise ConfigError(f"fitness dataset file {spec.path} has no rows; point it at a non-empty file")
        return builder, str(path)
    if spec.path in ("json", "parquet", "csv"):
        return spec.path, files
    return None


def load_items(spec: DatasetSpec, *, where: str = "fitness.dataset", required: tuple[str, ...] = ("prompt", "answer"),
               template: str | None = None) -> list[dict[str, Any]]:
    """Load a split as a list of row dicts with mapped columns; ConfigError for a missing
    column, an empty split or a dataset that cannot be read."""
    import datasets  # deferred: datasets pulls in pyarrow and pandas (seconds); only runs that load one need it

    local = _local_builder(spec)
    bars_were_off = datasets.is_progress_bar_enabled() is False
    datasets.disable_progress_bars()  # per-load bars are noise next to the per-generation line
    try:
        if local is not None:
            builder, files = local
            ds = datasets.load_dataset(builder, data_files=files, split="train" if spec.data_files is None else spec.split)
        else:
            ds = datasets.load_dataset(spec.path, spec.name, split=spec.split, revision=spec.revision,
                                       data_files=spec.data_files)
    except ConfigError:
        raise
    except Exception as exc:  # datasets raises many types; name the dataset and the cause
        cause = exc.__cause__ or exc.__context__  # e.g. the JSON parse error behind DatasetGenerationError
        detail = f"{type(exc).__name__}: {exc}" + (f" ({type(cause).__name__}: {cause})" if cause is not None else "")
        raise ConfigError(f"{where}: cannot load dataset {spec.path!r} (split {spec.split!r}): {detail}") from None
    finally:
        if not bars_were_off:
            datasets.enable_progress_bars()
    columns = list(ds.column_names)
    for target, source in spec.columns.items():
        if source not in columns:
            raise ConfigError(f"{where}.columns.{target}: column {source!r} is not in dataset {spec.path!r}; it has {columns}")
    rename = {source: target for target, source in spec.columns.items()}
    rows: list[dict[str, Any]] = []
    limit = spec.num_items
    for i, raw in enumerate(ds):
        if limit is not None and i >= limit:
            break
        row = dict(raw)
        for source, target in rename.items():
            row[target] = raw[source]
        rows.append(row)
    if not rows:
        raise ConfigError(f"{where}: dataset {spec.path!r} split {spec.split!r} has no rows; point it at a non-empty split")
    needed = list(required) + (template_fields(template) if template else [])
    for name in needed:
        if name not in rows[0]:
            mapped = f" (mapped from {spec.columns[name]!r})" if name in spec.columns else ""
            raise ConfigError(f"{where}: column {name!r}{mapped} is missing; dataset has {columns}; map one with {where}.columns.{name}")
    for i, row in enumerate(rows):
        empty = [name for name in needed if row.get(name) is None]
        if empty:
            raise ConfigError(f"{where}: row {i} of dataset {spec.path!r} has no value (null) for {empty[0]!r}; fill in or drop that row")
    return rows


def render_prompts(rows: list[dict[str, Any]], template: str) -> list[str]:
    """Fill the prompt template from each row."""
    return [template.format(**row) for row in rows]
