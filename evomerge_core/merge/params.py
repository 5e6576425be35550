"""Parameter resolution: turn a recipe's parameter settings into concrete values for one
tensor, following mergekit 0.1.5:

- precedence: the model's own `parameters`, then the recipe's top-level `parameters`, then the
  method's default; global parameters (normalize, lambda, t, ...) come from the top level only;
- a list of numbers is a gradient over the decoder layers: layer i of N sits at position
  t = i / (N - 1) (t = 1 when N == 1); tensors outside the layers (embeddings, final norm, LM
  head) sit at t = 0; the value is the linear interpolation between the two nearest entries;
- a list of `{filter, value}`: the first entry whose filter is null, `*`, or a substring of the
  tensor name wins; when none matches, the next scope is consulted.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from evomerge_core.sources.architectures import is_vision_tensor, layer_index
from evomerge_core.errors import ConfigError, MergeError
from evomerge_core.merge.methods import PARAM_RANGES, REQUIRED, MergeMethod, get_method
from evomerge_core.merge.recipe import ConditionalValue, MergeRecipe

# Accepted everywhere, never change the result (mergekit memory/speed options).
HARMLESS_PARAMS: frozenset[str] = frozenset({"int8_mask"})


@dataclass(frozen=True)
class MergePlan:
    """A validated recipe: the method and the ordered inputs it combines."""

    recipe: MergeRecipe
    method: MergeMethod
    base: str | None  # the base model when the method uses one
    inputs: tuple[str, ...]  # models carrying per-model parameters, in order
    reference: str  # model whose config, shapes and extra vocab rows the output takes


def layer_position(tensor_name: str, num_layers: int) -> float:
    """Gradient position t of a tensor: i/(N-1) for decoder layer i of N, 0 outside layers.

    Only the text (language model) layers count: a VLM's vision-tower layers have their own
    numbering and sit at t = 0 like the other tensors outside the decoder layers."""
    if is_vision_tensor(tensor_name):
        return 0.0
    idx = layer_index(tensor_name)
    if idx is None:
        return 0.0
    if num_layers <= 1:
        return 1.0
    return idx / (num_layers - 1)


def unmatched_filters(recipe: MergeRecipe, tensor_names: Sequence[str]) -> list[tuple[str, str, str]]:
    """Every `filter` of the recipe's parameters that is a substring of no tensor name, as
    (where, parameter, filter) (`null` and `*` match everything)."""
    found: list[tuple[str, str, str]] = []

    def walk(setting: Any, where: str, name: str) -> None:
        if isinstance(setting, Mapping):
            setting = ConditionalValue.model_validate(setting)
        if isinstance(setting, ConditionalValue):
            f = setting.filter
            if f not in (None, "*") and not any(f in t for t in tensor_names):
                found.append((where, name, f))
            walk(setting.value, where, name)
        elif isinstance(setting, list):
            for entry in setting:
                walk(entry, where, name)

    scopes = [("top-level parameters", recipe.parameters)] + [(f"parameters of {e.model}", e.parameters) for e in recipe.models]
    for where, params in scopes:
        for name, setting in params.items():
            walk(setting, where, name)
    return found


def evaluate_setting(setting: Any, tensor_name: str, t: float) -> Any:
    """The value of one setting for a tensor at gradient position t; None if no filter matches."""
    if isinstance(setting, ConditionalValue):
        setting = [setting]
    if isinstance(setting, Mapping):
        setting = [ConditionalValue.model_validate(setting)]
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if not isinstance(setting, list) or not setting:
        return None
    if all(isinstance(e, (ConditionalValue, Mapping)) for e in setting):
        for cond in setting:
            cond = cond if isinstance(cond, ConditionalValue) else ConditionalValue.model_validate(cond)
            if cond.filter is None or cond.filter == "*" or (tensor_name and cond.filter in tensor_name):
                return evaluate_setting(cond.value, tensor_name, t)
        return None
    if t > 1:  # a layer index beyond the config's depth (e.g. an extra prediction layer)
        raise MergeError(f"tensor {tensor_name} lies beyond the last of the model's decoder layers (config.json "
                         "num_hidden_layers), so a per-layer gradient cannot place it; give that parameter a single value")
    numeric = all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting)
    if not numeric:
        return setting[int(t * (len(setting) - 1))]
    scaled = t * (len(setting) - 1)
    i0 = int(scaled)
    i1 = min(len(setting) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * setting[i0] + frac * setting[i1]


def _coerce(method: MergeMethod, name: str, value: Any, where: str) -> Any:
    default = method.default_for(name)
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if value in (0, 1):
            return bool(value)
        raise MergeError(f"parameter {name!r} must be true or false, got {value!r} ({where})")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MergeError(f"parameter {name!r} must be a number, got {value!r} ({where})")
    value = float(value)
    if name in PARAM_RANGES:
        lo, hi = PARAM_RANGES[name]
        if not lo <= value <= hi:
            raise MergeError(f"parameter {name!r} must be in [{lo}, {hi}], got {value} ({where})")
    return value


def _numbers_in(setting: Any) -> list[Any]:
    """All scalar endpoints in a setting (gradients interpolate between them)."""
    if isinstance(setting, ConditionalValue):
        return _numbers_in(setting.value)
    if isinstance(setting, list):
        return [v for e in setting for v in _numbers_in(e)]
    return [setting]


def _check_names(method: MergeMethod, params: Mapping[str, Any], *, per_model: bool, where: str) -> None:
    allowed = set(method.model_params) | (set() if per_model else set(method.global_params))
    for name in params:
        if name in allowed or name in HARMLESS_PARAMS:
            continue
        if per_model and name in method.global_params:
            raise ConfigError(f"parameter {name!r} of {method.name} is global; move it from {where} to the top-level parameters")
        close = difflib.get_close_matches(name, sorted(allowed), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        names = ", ".join(sorted(allowed)) or "none"
        raise ConfigError(f"unknown parameter {name!r} for merge method {method.name} in {where}{hint}; allowed: {names}")


def plan_recipe(recipe: MergeRecipe) -> MergePlan:
    """Validate a recipe (method, base, duplicates, parameter names and ranges) into a plan."""
    method = get_method(recipe.merge_method)
    listed = [entry.model for entry in recipe.models]
    seen: set[str] = set()
    for name in listed:
        if name in seen:
            raise ConfigError(f"model {name!r} is listed twice in the recipe; list each model once")
        seen.add(name)
    if not listed:
        raise ConfigError("the recipe lists no models; add at least one entry under 'models'")
    base = recipe.base_model
    if method.needs_base and not base:
        raise ConfigError(f"merge method {method.name} needs a base model; set base_model to the model the others were fine-tuned from")
    if method.needs_base:
        inputs = tuple(m for m in listed if m != base)
    else:
        # mergekit treats a base of a base-less method as one more ordinary input.
        inputs = tuple(listed) + ((base,) if base and base not in listed else ())
    if method.num_models is not None and len(inputs) != method.num_models:
        raise ConfigError(
            f"merge method {method.name} needs a base and exactly {method.num_models} other model(s), got {len(inputs)} other(s)"
        )
    if method.needs_base and not inputs:
        raise ConfigError(f"merge method {method.name} needs at least one model besides the base {base!r}")
    _check_names(method, recipe.parameters, per_model=False, where="top-level parameters")
    for entry in recipe.models:
        _check_names(method, entry.parameters, per_model=True, where=f"parameters of {entry.model}")
    scopes = [("top-level parameters", recipe.parameters)] + [(f"parameters of {e.model}", e.parameters) for e in recipe.models]
    for where, params in scopes:
        for name, setting in params.items():
            if name in HARMLESS_PARAMS:
                continue
            for value in _numbers_in(setting):
                _coerce(method, name, value, where)
    reference = base if base else listed[0]
    return MergePlan(recipe=recipe, method=method, base=base if method.needs_base else None, inputs=inputs, reference=reference)


def _resolve(method: MergeMethod, name: str, scopes: Sequence[Mapping[str, Any]], tensor_name: str, t: float, model: str | None) -> Any:
    for scope in scopes:
        if name in scope:
            value = evaluate_setting(scope[name], tensor_name, t)
            if value is not None:
                where = f"{model}, {tensor_name}" if model else tensor_name
                return _coerce(method, name, value, where)
    default = method.default_for(name)
    if default is REQUIRED:
        who = f" for model {model!r}" if model else ""
        raise MergeError(
            f"merge method {method.name} needs parameter {name!r}{who} (tensor {tensor_name}); set it in the recipe's parameters"
        )
    return default


def resolve_tensor_params(plan: MergePlan, tensor_name: str, num_layers: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(global params, per-input params in `plan.inputs` order) for one tensor."""
    recipe, method = plan.recipe, plan.method
    t = layer_position(tensor_name, num_layers)
    per_model_settings = {entry.model: entry.parameters for entry in recipe.models}
    global_params = {
        name: _resolve(method, name, [recipe.parameters], tensor_name, t, None) for name in method.global_params
    }
    model_params = []
    for model in plan.inputs:
        scopes = [per_model_settings.get(model, {}), recipe.parameters]
        model_params.append({name: _resolve(method, name, scopes, tensor_name, t, model) for name in method.model_params})
    return global_params, model_params
