"""Load a mergekit YAML config or an evomerge recipe YAML into a `MergeRecipe`, and export a
recipe back to mergekit YAML.

Supported mergekit subset: `merge_method` (linear, task_arithmetic, ties, dare_ties,
dare_linear, slerp), `base_model`, `models: [{model, parameters}]`, top-level `parameters`,
`dtype`, `out_dtype`, `tokenizer_source` (base or a model). A `slices:` config with a single
slice whose sources all span the same full layer range is accepted and read as `models:`.
Options that do not change the result (`int8_mask`) are accepted with a note. Everything else
(`modules`, multi-slice configs, `tokenizer:` blocks, `chat_template`, LoRA `model+lora`
references, `tokenizer_source: union`) is refused with a clear error.

An evomerge recipe is the same schema plus `seed` (for DARE); it may also be wrapped in a
top-level `recipe:` key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from evomerge_core.errors import ConfigError
from evomerge_core.merge.params import HARMLESS_PARAMS, plan_recipe
from evomerge_core.merge.recipe import MergeRecipe

_TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source", "seed", "slices"}
_UNSUPPORTED = {
    "modules": "per-module configs",
    "tokenizer": "tokenizer surgery blocks (use tokenizer_source: base or a model)",
    "chat_template": "chat_template overrides",
}


def _normalise_params(params: Any, where: str) -> dict[str, Any]:
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise ConfigError(f"{where} must be a mapping of parameter names to values")
    out = {}
    for name, value in params.items():
        if isinstance(value, dict):  # a single {filter, value} is a one-entry conditional list
            value = [value]
        out[str(name)] = value
    return out


def _slices_to_models(slices: Any) -> tuple[list[dict[str, Any]], tuple[int, ...]]:
    if not isinstance(slices, list) or len(slices) != 1 or not isinstance(slices[0], dict):
        raise ConfigError("only a single-slice 'slices:' config is supported; use 'models:' or one slice covering all layers")
    sl = slices[0]
    if set(sl) - {"sources"}:
        raise ConfigError(f"slice options {sorted(set(sl) - {'sources'})} are not supported; move parameters to the top level")
    ranges = {tuple(src.get("layer_range", ())) for src in sl.get("sources", [])}
    if len(ranges) != 1 or next(iter(ranges))[:1] != (0,):
        raise ConfigError("slice sources must all use the same layer_range starting at 0 (a whole-model merge); layer stacking is not supported")
    return [{"model": src["model"], "parameters": src.get("parameters") or {}} for src in sl["sources"]], next(iter(ranges))


@dataclass(frozen=True)
class LoadedConfig:
    """A loaded config: the recipe, notes for the user, and the layer range of a slices config
    (the caller checks it spans the whole model once the sources are known)."""

    recipe: MergeRecipe
    notes: list[str]
    layer_range: tuple[int, int] | None = None


def recipe_from_dict(data: Any, source: str = "config") -> tuple[MergeRecipe, list[str]]:
    """Build a validated recipe from a parsed YAML mapping; returns (recipe, notes)."""
    loaded = load_config_dict(data, source)
    return loaded.recipe, loaded.notes


def load_config_dict(data: Any, source: str = "config") -> LoadedConfig:
    """Like `recipe_from_dict`, also returning the slice layer range when there was one."""
    if isinstance(data, dict) and set(data) == {"recipe"}:
        data = data["recipe"]
    if not isinstance(data, dict):
        raise ConfigError(f"{source} is not a YAML mapping; expected merge_method, models, ...")
    data = dict(data)
    notes: list[str] = []
    for key, what in _UNSUPPORTED.items():
        if data.get(key) not in (None, {}, ""):
            raise ConfigError(f"{source}: {key!r} ({what}) is not supported by evomerge merge")
        data.pop(key, None)
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {sorted(unknown)}; supported: {sorted(_TOP_KEYS - {'slices'})}")
    layer_range = None
    if "slices" in data:
        if data.get("models"):
            raise ConfigError(f"{source}: give either 'models' or 'slices', not both")
        data["models"], layer_range = _slices_to_models(data.pop("slices"))
    models = data.get("models") or []
    if not isinstance(models, list):
        raise ConfigError(f"{source}: 'models' must be a list of {{model: ..., parameters: ...}}")
    clean_models = []
    for entry in models:
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise ConfigError(f"{source}: each entry of 'models' needs a 'model' key")
        if not isinstance(entry["model"], str):
            raise ConfigError(f"{source}: model references must be strings, got {entry['model']!r}")
        if "+" in entry["model"]:
            raise ConfigError(f"{source}: LoRA references like {entry['model']!r} are not supported; merge the adapter first")
        extra = set(entry) - {"model", "parameters"}
        if extra:
            raise ConfigError(f"{source}: unknown key(s) {sorted(extra)} in the entry for {entry['model']}")
        clean_models.append({"model": entry["model"], "parameters": _normalise_params(entry.get("parameters"), f"parameters of {entry['model']}")})
    data["models"] = clean_models
    data["parameters"] = _normalise_params(data.get("parameters"), "top-level parameters")
    if data.get("tokenizer_source") == "union":
        raise ConfigError(f"{source}: tokenizer_source: union is not supported; use base or one model reference")
    for scope in [data["parameters"]] + [m["parameters"] for m in clean_models]:
        for name in list(scope):
            if name in HARMLESS_PARAMS:
                notes.append(f"note: parameter {name!r} does not change the result and is ignored")
                del scope[name]
    try:
        recipe = MergeRecipe.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{source}: invalid value at {loc}: {first['msg']}") from None
    plan_recipe(recipe)  # method, base, duplicates, parameter names and ranges
    if layer_range is not None:
        notes.append(f"note: read the single slice (layer_range {list(layer_range)}) as a whole-model merge")
    lr = (int(layer_range[0]), int(layer_range[1])) if layer_range is not None else None
    return LoadedConfig(recipe, sorted(set(notes)), lr)


def load_recipe(path: Path | str) -> tuple[MergeRecipe, list[str]]:
    """Read a mergekit YAML or an evomerge recipe YAML; returns (recipe, notes)."""
    loaded = load_config(path)
    return loaded.recipe, loaded.notes


def load_config(path: Path | str) -> LoadedConfig:
    """Read a mergekit YAML or an evomerge recipe YAML into a LoadedConfig."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    return load_config_dict(data, str(path))


def to_mergekit_yaml(recipe: MergeRecipe) -> str:
    """The recipe as mergekit YAML (mergekit has no `seed` key; it is kept as a comment)."""
    data = recipe.to_yaml_dict()
    seed = data.pop("seed", None)
    text = yaml.safe_dump(data, sort_keys=False)
    if seed is not None:
        text = f"# evomerge seed: {seed} (pass --random-seed to mergekit)\n" + text
    return text
