"""The static checks of a run config that need the registries (merge methods, scorers, storage
URLs, the Hub's repo ids) but no downloads: `check_run_config`, run by `parse_run_config` after
the schema (config/schema.py) has validated each field on its own."""

from __future__ import annotations

import difflib
import re
import string
from typing import TYPE_CHECKING, Any

from evomerge_core.errors import ConfigError, MergeError, StorageError, UsageError
from evomerge_core.fitness.budget.checks import check_budget, check_budget_space
from evomerge_core.fitness.contamination import check_fitness_contamination
from evomerge_core.fitness.registry import get_scorer, validate_scorer
from evomerge_core.io.dtypes import check_dtype_name
from evomerge_core.merge.methods import PARAM_RANGES, get_method
from evomerge_core.merge.params import plan_recipe
from evomerge_core.merge.recipe import MergeRecipe, ModelEntry
from evomerge_core.publish.hub import check_repo_id
from evomerge_core.runs.storage import parse_storage_url

if TYPE_CHECKING:  # the schema imports this module to run the checks
    from evomerge_core.config.schema import FitnessConfig, RunConfig

DEVICE_FORMS = "cpu, cuda, cuda:N or mps"


def check_run_config(config: RunConfig) -> None:
    """Cross-field checks needing registries but no downloads; raises ConfigError."""
    refs = [s.model for s in config.sources]
    dupes = sorted({r for r in refs if refs.count(r) > 1})
    if dupes:
        raise ConfigError(f"sources: {dupes[0]!r} is listed twice; list each source model once")
    bases = [s.model for s in config.sources if s.base]
    if len(bases) > 1:
        raise ConfigError(f"sources: {len(bases)} models are marked base: true; mark exactly one")
    if config.stages is not None:
        _check_stages(config)
    elif config.space.kind == "dfs":
        _check_dfs_space(config)
    else:
        _check_ps_space(config, bases)
    _check_fitness(config.fitness)
    if config.fitness.budget is not None and config.stages is None:
        check_budget_space(config)
    _check_vlm(config)
    _check_runtime_output(config)
    if not (config.storage.startswith(("file://", "s3://", "memory://")) or "://" not in config.storage):
        raise ConfigError(f"storage: {config.storage!r} is not supported; use a file:// directory or an s3:// URL")
    if not config.storage.startswith("memory://"):
        try:
            parse_storage_url(config.storage)  # the form only; access is checked before the run starts
        except StorageError as exc:
            raise ConfigError(f"storage: {exc}") from None


def _check_runtime_output(config: RunConfig) -> None:
    """Dtypes, the device's form and the publish target: what the end of a run would otherwise
    find out (the device's presence is checked before the run starts, on the machine running it)."""
    check_dtype_name("runtime.dtype", config.runtime.dtype)
    if config.output.dtype is not None:
        check_dtype_name("output.dtype", config.output.dtype)
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", config.runtime.device):
        raise ConfigError(f"runtime.device: {config.runtime.device!r} is not supported; use {DEVICE_FORMS}")
    publish = config.output.publish
    if publish.repo_id is not None:
        try:
            check_repo_id(publish.repo_id)
        except UsageError as exc:
            raise ConfigError(f"output.publish.repo_id: {exc}") from None
        if not config.output.materialise_best:
            raise ConfigError("output.publish.repo_id is set but output.materialise_best is false, so there would be "
                              "no model to publish; set materialise_best: true or remove repo_id")
    rev = publish.revision
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/-]*", rev) or ".." in rev or rev.endswith((".lock", "/", ".")):
        raise ConfigError(f"output.publish.revision: {rev!r} is not a valid branch name; use e.g. main or v1 "
                          "(letters, digits, '.', '_', '-', '/')")
    if publish.license is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.+-]*", publish.license):
        raise ConfigError(f"output.publish.license: {publish.license!r} is not a license id; use an SPDX-style id "
                          "such as apache-2.0 or mit (the Hub's license identifiers)")


def _check_vlm(config: RunConfig) -> None:
    """A VLM run: one source marked vlm, a PS space, and an image scorer only with a VLM."""
    vlms = [s.model for s in config.sources if s.vlm]
    if len(vlms) > 1:
        raise ConfigError(f"sources: {len(vlms)} models are marked vlm: true; mark exactly one VLM and list LLMs to merge into it")
    if vlms and (config.stages is not None or config.space.kind != "ps"):
        raise ConfigError("sources: a VLM (vlm: true) is merged with space.ps only; DFS and chained runs take LLMs")
    if vlms and len(config.sources) < 2:
        raise ConfigError("sources: list at least one LLM to merge into the VLM's language model")
    if get_scorer(config.fitness.scorer).needs_images and not vlms:
        raise ConfigError(f"fitness.scorer {config.fitness.scorer!r} scores a VLM on images; mark the VLM source with vlm: true")


def _check_stages(config: RunConfig) -> None:
    """Each stage must be a valid single-stage run once expanded; names must be unique."""
    assert config.stages is not None
    names = [config.stage_name(i) for i in range(len(config.stages))]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"stages: two stages are named {dupes[0]!r}; give each stage its own name")
    for i in range(len(config.stages)):
        config.stage_config(i)  # raises ConfigError naming stages[i]
        if i > 0 and not config.stage_refs(i):
            raise ConfigError(
                f"stages[{i}] does not use an earlier stage's model; set space.dfs.model_a to "
                f"'@{names[i - 1]}' (or model_b), or run it as a separate run"
            )


def _check_dfs_space(config: RunConfig) -> None:
    """A DFS run has exactly two sources, A and B, named by space.dfs.model_a/model_b."""
    dfs = config.space.dfs
    assert dfs is not None
    refs = [s.model for s in config.sources]
    if len(refs) != 2:
        raise ConfigError(f"sources: a DFS run combines exactly two models (A and B), got {len(refs)}; "
                          "list only space.dfs.model_a and space.dfs.model_b")
    if dfs.model_a == dfs.model_b:
        raise ConfigError("space.dfs.model_b is the same model as model_a; DFS combines two different sources")
    for field in ("model_a", "model_b"):
        ref = getattr(dfs, field)
        if ref not in refs:
            raise ConfigError(f"space.dfs.{field}: {ref!r} is not one of the sources {refs}{did_you_mean(ref, refs)}; name one of them")
    if any(s.base for s in config.sources):
        raise ConfigError("sources: base: true has no meaning in a DFS run (A and B are named by space.dfs.model_a/model_b); remove it")


def _check_fitness(fitness: FitnessConfig) -> None:
    """Scorer, prompt template and the minibatch/validation protocol."""
    validate_scorer(fitness)
    _check_prompt_template(fitness.prompt_template)
    if fitness.selection == "validation" and fitness.validation is None:
        raise ConfigError("fitness.selection is 'validation' but fitness.validation is not set; add a validation dataset or use selection: train")
    if fitness.minibatch is not None and fitness.dataset is None:
        raise ConfigError("fitness.minibatch needs fitness.dataset to draw from; add a dataset or remove minibatch")
    if fitness.budget is not None:
        check_budget(fitness)
    check_fitness_contamination(fitness)  # selecting on a benchmark's test split needs explicit consent


def _check_ps_space(config: RunConfig, bases: list[str]) -> None:
    """PS: the merge method, its per-model parameters, bounds and initial point."""
    ps = config.space.ps
    assert ps is not None
    try:
        method = get_method(ps.method)
    except MergeError as exc:
        raise ConfigError(f"space.ps.method: {exc}") from None
    if method.needs_base and not bases:
        raise ConfigError(
            f"sources: merge method {ps.method!r} works on task vectors and needs a base model; "
            "mark one source with base: true"
        )
    inputs = [s.model for s in config.sources if not (s.base and method.needs_base)]
    if not inputs:
        raise ConfigError("sources: list at least one model besides the base to merge into it")
    if method.num_models is not None and len(inputs) != method.num_models:
        raise ConfigError(f"sources: merge method {ps.method!r} takes exactly {method.num_models} non-base model(s), got {len(inputs)}")
    params = ps.params if ps.params is not None else list(method.model_params)
    if not params:
        raise ConfigError(f"space.ps.params: merge method {ps.method!r} has no per-model parameters to evolve")
    for p in params:
        if p not in method.model_params:
            raise ConfigError(f"space.ps.params: {p!r} is not a per-model parameter of {ps.method!r}"
                              f"{did_you_mean(p, method.model_params)}; choose from {list(method.model_params)}")
    if len(set(params)) != len(params):
        raise ConfigError("space.ps.params: a parameter is listed twice")
    for name in ps.bounds:
        if name not in params:
            raise ConfigError(f"space.ps.bounds: {name!r} is not an evolved parameter{did_you_mean(name, params)}; evolved: {params}")
    if isinstance(ps.x0, dict):
        for name in ps.x0:
            if name not in params:
                raise ConfigError(f"space.ps.x0: {name!r} is not an evolved parameter{did_you_mean(name, params)}; evolved: {params}")
    for p in params:
        lo, hi = ps.bounds_of(p)
        if p in PARAM_RANGES:
            vlo, vhi = PARAM_RANGES[p]
            if lo < vlo or hi > vhi:
                raise ConfigError(f"space.ps.bounds.{p}: [{lo}, {hi}] leaves the valid range [{vlo}, {vhi}] of {p}")
        x0 = ps.x0_of(p)
        if not lo <= x0 <= hi:
            raise ConfigError(f"space.ps.x0: initial {p} {x0} lies outside its bounds [{lo}, {hi}]")
    for key in ps.fixed:
        if key not in method.global_params:
            raise ConfigError(f"space.ps.fixed: {key!r} is not a global parameter of {ps.method!r}"
                              f"{did_you_mean(key, method.global_params)}; choose from {sorted(method.global_params)}")
    if not isinstance(ps.granularity, str) and ps.granularity.layer_groups < 1:
        raise ConfigError("space.ps.granularity.layer_groups must be at least 1")
    _check_fixed_values(config)


def _check_fixed_values(config: RunConfig) -> None:
    """The values of space.ps.fixed pass the merge path's recipe checks (types, ranges)."""
    ps = config.space.ps
    assert ps is not None
    base = config.base
    recipe = MergeRecipe(merge_method=ps.method, base_model=base, parameters=dict(ps.fixed),
                         models=[ModelEntry(model=s.model) for s in config.sources if s.model != base])
    try:
        plan_recipe(recipe)
    except (ConfigError, MergeError) as exc:
        raise ConfigError(f"space.ps.fixed: {exc}") from None


def _check_prompt_template(template: str) -> None:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise ConfigError(f"fitness.prompt_template is not a valid format string ({exc}); use {{prompt}} placeholders "
                          "and double braces for literal ones") from None
    if any(f == "" or f.isdigit() for f in fields):
        raise ConfigError("fitness.prompt_template: use named placeholders such as {prompt}, not {} or {0}")


def did_you_mean(word: object, choices: Any) -> str:
    """' (did you mean X?)' for the closest of `choices`, else ''."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
