"""The run config of an evolutionary merge (`evomerge evolve CONFIG.yaml`): pydantic models,
YAML loading with friendly errors, and the static checks that run before anything is loaded.

A run = sources (one marked ``base``) + a search space + an optimizer + a fitness + storage.
Defaults follow the paper (Akiba et al. 2025, PS): x0 0.5, sigma0 1/6, popsize
4 + floor(3 ln n), bounds [0, 1], no weight normalisation, 1000 evaluations.
"""

from __future__ import annotations

import hashlib
import json
import string
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator

from evomerge_core.config.checks import check_run_config, did_you_mean
from evomerge_core.errors import ConfigError, UsageError
from evomerge_core.merge.recipe import ParamValue
from evomerge_core.config.task_runner import TaskRunnerConfig
from evomerge_core.fitness.budget.config import BudgetConfig
from evomerge_core.config.dfs_space import DFSSpaceConfig

DEFAULT_STORAGE = "file://./runs"
DEFAULT_EVALUATIONS = 1000  # the paper's PS budget (Optuna CMA-ES, 1000 trials)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceSpec(_Strict):
    """One source model: a Hub id (``org/name[@revision]``), a local dir or an fsspec URL."""

    model: str = Field(min_length=1)
    base: bool = False
    # A vision-language model whose language model the other sources are merged into
    # (evomerge_core.kinds.vlm); its vision tower, projector and processor are kept.
    vlm: bool = False
    # Accept pickle `.bin` weights (converted once to safetensors); pickles can run code when
    # loaded, so each source opts in. Never changes results: left out of the config hash.
    allow_pickle: bool = False

    @model_serializer(mode="wrap")
    def _drop_default_vlm(self, handler: Any) -> Any:
        # LLM-only configs dump (and hash) exactly as before VLM sources existed.
        data = handler(self)
        if isinstance(data, dict) and not self.vlm:
            data.pop("vlm", None)
        if isinstance(data, dict) and not self.allow_pickle:
            data.pop("allow_pickle", None)
        return data


class LayerGroups(_Strict):
    """Split the decoder layers into N contiguous groups, each with its own parameters."""

    layer_groups: int = Field(ge=1)


class PSSpaceConfig(_Strict):
    """Parameter-space search: evolve the per-model parameters of one merge method."""

    method: str = "dare_ties"
    # Per-model parameters to evolve; default: all the method's per-model parameters.
    params: list[str] | None = None
    granularity: Union[Literal["model"], LayerGroups] = "model"
    # Per-parameter [low, high]; default [0, 1].
    bounds: dict[str, tuple[float, float]] = Field(default_factory=dict)
    # Initial point: one value for all, or one per parameter name.
    x0: Union[float, dict[str, float]] = 0.5
    # Global method parameters held fixed (normalize, lambda, ...).
    fixed: dict[str, ParamValue] = Field(default_factory=dict)
    # Seed of stochastic merge methods (DARE's random drop), fixed for the whole run.
    merge_seed: int = 0

    @field_validator("granularity", mode="before")
    @classmethod
    def _granularity(cls, value: Any) -> Any:
        if value == "model" or isinstance(value, LayerGroups):
            return value
        if isinstance(value, dict) and set(value) == {"layer_groups"}:
            return value
        raise ValueError("must be 'model' or {layer_groups: N}")

    @field_validator("bounds")
    @classmethod
    def _bounds_ordered(cls, value: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        for name, (lo, hi) in value.items():
            if not lo < hi:
                raise ValueError(f"bounds of {name!r} are reversed or empty ([{lo}, {hi}]); write them as [low, high]")
        return value

    def bounds_of(self, param: str) -> tuple[float, float]:
        """The [low, high] bounds of a parameter."""
        lo, hi = self.bounds.get(param, (0.0, 1.0))
        return float(lo), float(hi)

    def x0_of(self, param: str) -> float:
        """The initial value of a parameter."""
        if isinstance(self.x0, dict):
            return float(self.x0.get(param, 0.5))
        return float(self.x0)


class SpaceConfig(_Strict):
    """The search space: exactly one of ``ps`` (parameter space, the default) or ``dfs``
    (data-flow space over two models A and B, see docs/dfs.md)."""

    ps: PSSpaceConfig | None = None
    dfs: DFSSpaceConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_space(cls, value: Any) -> Any:
        if isinstance(value, dict):
            if value.get("ps") is not None and value.get("dfs") is not None:
                raise ValueError("set either ps or dfs, not both (chain them with stages: instead)")
            if value.get("ps") is None and value.get("dfs") is None:
                value = {**value, "ps": {}}
        return value

    @model_serializer(mode="wrap")
    def _drop_unused(self, handler: Any) -> Any:
        # Only the space in use is written, so a PS config dumps (and hashes) as before DFS existed.
        data = handler(self)
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    @property
    def kind(self) -> Literal["ps", "dfs"]:
        """Which space is in use."""
        return "dfs" if self.dfs is not None else "ps"


class OptimizerConfig(_Strict):
    """CMA-ES settings; the budget is `generations` or `evaluations` (whole generations)."""

    name: Literal["cma"] = "cma"
    sigma0: float = Field(default=1 / 6, gt=0)
    popsize: int | None = Field(default=None, ge=2)
    seed: int = 0
    generations: int | None = Field(default=None, ge=1)
    evaluations: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one_budget(self) -> OptimizerConfig:
        if self.generations is not None and self.evaluations is not None:
            raise ValueError("set either generations or evaluations, not both")
        return self


class DatasetSpec(_Strict):
    """Where fitness items come from (`datasets`): a Hub dataset id or local file(s).

    `columns` maps our names to the dataset's: ``{prompt: question, answer: answer_number}``.
    """

    path: str = Field(min_length=1)
    name: str | None = None
    split: str = "train"
    data_files: Union[str, list[str], dict[str, Union[str, list[str]]], None] = None
    revision: str | None = None
    columns: dict[str, str] = Field(default_factory=dict)
    num_items: int | None = Field(default=None, ge=1)


class FitnessConfig(_Strict):
    """How a candidate model is scored on the training items."""

    dataset: DatasetSpec | None = None
    # Held-out split, reported for the best model only, never used for selection.
    test: DatasetSpec | None = None
    # Score each generation on a random subset of this many training items (the same subset
    # for every candidate of a generation; drawn from (optimizer.seed, generation)).
    minibatch: int | None = Field(default=None, ge=1)
    # Validation split: each generation's best candidate is scored on it.
    validation: DatasetSpec | None = None
    # How the run's best model is chosen: the highest training fitness ("train") or the
    # generation best with the highest validation fitness ("validation", the paper's DFS protocol).
    selection: Literal["train", "validation"] = "train"
    scorer: str = "math_accuracy"
    options: dict[str, Any] = Field(default_factory=dict)
    # Reported accuracy: "auto" (the fitness itself for accuracy scorers, else exact_match),
    # a scorer name, or "none".
    accuracy_scorer: str = "auto"
    accuracy_options: dict[str, Any] = Field(default_factory=dict)
    prompt_template: str = "{prompt}"
    max_new_tokens: int = Field(default=256, ge=1)
    stop_strings: list[str] = Field(default_factory=list)
    batch_size: int = Field(default=16, ge=1)
    # Fitness recorded for a failed candidate; default: the scorer's worst value.
    failure_fitness: float | None = None
    # Allow selecting on a known benchmark's evaluation split (refused by default; see
    # evomerge_core.fitness.contamination); the model card then says so.
    allow_benchmark_test_split: bool = False
    # Fewer evaluations for the same result: racing, item subsets, length caps (docs/budget.md).
    budget: BudgetConfig | None = None

    @model_serializer(mode="wrap")
    def _drop_no_budget(self, handler: Any) -> Any:
        # Configs without a budget dump (and hash) exactly as before it existed.
        data = handler(self)
        if isinstance(data, dict) and self.budget is None:
            data.pop("budget", None)
        return data


class RuntimeConfig(_Strict):
    """Where and in what dtype candidates are evaluated."""

    device: str = "cpu"
    dtype: str = "float32"
    torch_threads: int | None = Field(default=None, ge=1)
    # Where candidates run (Prefect's default runner or Dask workers); never changes results,
    # so it is left out of the config hash and candidate keys (evomerge_core.config.task_runner).
    task_runner: TaskRunnerConfig = Field(default_factory=TaskRunnerConfig)
    # Greedy generation for scoring: "engine" (evomerge_core.generation.engine, continuous batching), "hf"
    # (the reference loop) or "auto" (engine on CUDA, reference loop elsewhere); same outputs.
    generation: Literal["auto", "engine", "hf"] = "auto"

    @model_validator(mode="after")
    def _runner_fits_device(self) -> RuntimeConfig:
        try:
            self.task_runner.check_device(self.device)
        except ValueError as exc:
            raise ValueError(str(exc)) from None
        return self

    @model_serializer(mode="wrap")
    def _drop_default_runner(self, handler: Any) -> Any:
        # Configs without scale-out settings dump (and hash) exactly as before they existed.
        data = handler(self)
        if isinstance(data, dict) and self.task_runner.is_unset:
            data.pop("task_runner", None)
        if isinstance(data, dict) and self.generation == "auto":
            data.pop("generation", None)
        return data


class PublishConfig(_Strict):
    """Upload of the best model to the Hub at the end of the run (the publish flow; also
    `evomerge publish`). Nothing is uploaded while `repo_id` is unset."""

    repo_id: str | None = None
    private: bool = True
    revision: str = "main"
    # The merged model's license when it cannot be derived from the sources' licenses.
    license: str | None = None
    force_license: bool = False
    # Pause the flow run before pushing until someone resumes it.
    approve: bool = False
    # Prefect Secret block holding the Hub token (default: HF_TOKEN or the huggingface_hub login).
    token_secret_block: str | None = None


class OutputConfig(_Strict):
    """What is written at the end of a run."""

    materialise_best: bool = True
    dtype: str | None = None
    report: bool = True
    publish: PublishConfig = Field(default_factory=PublishConfig)


class StageConfig(_Strict):
    """One stage of a chained run (``stages:``): its own search space, and optionally its
    own sources, optimizer and fitness overrides; everything else comes from the top level.

    In a DFS stage, ``model_a``/``model_b`` may be ``"@NAME"`` or ``"@INDEX"``: the best model
    of an earlier stage. Sections are kept raw here and validated per stage (see
    `RunConfig.stage_config`), so errors name the stage.
    """

    name: str | None = None
    space: dict[str, Any]
    sources: list[dict[str, Any]] | None = None
    optimizer: dict[str, Any] | None = None  # replaces the top-level optimizer section
    fitness: dict[str, Any] | None = None  # keys override the top-level fitness keys

    @field_validator("name")
    @classmethod
    def _name_safe(cls, value: str | None) -> str | None:
        if value is not None and (not value or not set(value) <= set(string.ascii_letters + string.digits + "-_") or value.isdigit()):
            raise ValueError("use letters, digits, '-' and '_' (not only digits)")
        return value


STAGE_REF = "@"


class RunConfig(_Strict):
    """A complete evolutionary-merge run."""

    run_key: str | None = None
    storage: str = DEFAULT_STORAGE
    storage_options: dict[str, Any] = Field(default_factory=dict)
    sources: list[SourceSpec] = Field(min_length=1)
    space: SpaceConfig = Field(default_factory=SpaceConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    fitness: FitnessConfig = Field(default_factory=FitnessConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    # A chained run (e.g. PS then DFS); each stage is a sub-run under {run}/stages/{i}/.
    stages: list[StageConfig] | None = Field(default=None, min_length=2)

    @model_validator(mode="after")
    def _stages_own_the_space(self) -> RunConfig:
        if self.stages is not None and "space" in self.model_fields_set:
            raise ValueError("a chained run sets the space of each stage under stages:, not a top-level space:")
        return self

    @model_serializer(mode="wrap")
    def _drop_no_stages(self, handler: Any) -> Any:
        # Single-stage configs dump (and hash) exactly as before stages existed; a chained
        # config has no top-level space (each stage has its own).
        data = handler(self)
        if isinstance(data, dict):
            data.pop("stages" if data.get("stages") is None else "space", None)
        return data

    @field_validator("run_key")
    @classmethod
    def _run_key_safe(cls, value: str | None) -> str | None:
        if value is not None:
            allowed = set(string.ascii_letters + string.digits + "-_.")
            if not value or not set(value) <= allowed or value.startswith("."):
                raise ValueError("use only letters, digits, '-', '_' and '.' (not leading)")
        return value

    @property
    def base(self) -> str | None:
        """The model marked ``base: true``, if any."""
        bases = [s.model for s in self.sources if s.base]
        return bases[0] if bases else None

    @property
    def vlm(self) -> str | None:
        """The source marked ``vlm: true`` (a VLM run), if any."""
        vlms = [s.model for s in self.sources if s.vlm]
        return vlms[0] if vlms else None

    def effective_run_key(self) -> str:
        """`run_key`, or `evolve-<hash of the config>` when none is set."""
        return self.run_key or f"evolve-{self.config_hash()[:12]}"

    def config_hash(self) -> str:
        """A stable hash of everything that changes results (not the run key or storage)."""
        payload = self.model_dump(mode="json", exclude={"run_key": True, "storage": True, "storage_options": True,
                                                          "output": True, "runtime": {"task_runner"}})
        for source in payload.get("sources", []):
            source.pop("allow_pickle", None)  # how weights are read, not what they are
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def generations(self, popsize: int) -> int:
        """Number of generations: `generations`, else ceil(evaluations / popsize)."""
        if self.optimizer.generations is not None:
            return self.optimizer.generations
        evals = self.optimizer.evaluations or DEFAULT_EVALUATIONS
        return -(-evals // popsize)

    # ------------------------------------------------------------------ chained runs

    def stage_name(self, index: int) -> str:
        """A stage's name: its `name`, else its index."""
        assert self.stages is not None
        return self.stages[index].name or str(index)

    def stage_index(self, ref: str, *, before: int) -> int:
        """The index of the stage an ``@NAME``/``@INDEX`` reference names (must precede `before`)."""
        assert self.stages is not None
        key = ref[len(STAGE_REF):]
        names = {self.stage_name(i): i for i in range(len(self.stages))}
        found = names.get(key, int(key) if key.isdigit() and int(key) < len(self.stages) else None)
        if found is None:
            raise ConfigError(f"{ref!r} names no stage; use @INDEX or @NAME of an earlier stage (stages: {list(names)})")
        if found >= before:
            raise ConfigError(f"{ref!r} names stage {found}, which does not run before stage {before}; refer to an earlier stage")
        return found

    def stage_config(self, index: int, best_models: dict[int, str] | None = None) -> RunConfig:
        """Stage `index` as a single-stage run config stored under ``{run}/stages/{index}/``.

        ``@`` references are replaced by ``best_models[stage]`` (URLs of earlier stages' best
        models) when given, else left in place (for validation before anything runs).
        Raises ConfigError naming the stage.
        """
        assert self.stages is not None
        stage = self.stages[index]
        where = f"stages[{index}]"
        data = self.model_dump(mode="json", exclude={"stages", "space", "run_key", "storage"})
        data["run_key"] = str(index)
        data["storage"] = f"{self.storage.rstrip('/')}/{self.effective_run_key()}/stages"
        space = _deep_copy(stage.space)
        dfs = space.get("dfs") if isinstance(space, dict) else None
        if isinstance(dfs, dict):
            for field in ("model_a", "model_b"):
                ref = dfs.get(field)
                if isinstance(ref, str) and ref.startswith(STAGE_REF):
                    try:
                        earlier = self.stage_index(ref, before=index)
                    except ConfigError as exc:
                        raise ConfigError(f"{where}.space.dfs.{field}: {exc}") from None
                    if best_models is not None:
                        dfs[field] = best_models[earlier]
        data["space"] = space
        if stage.sources is not None:
            data["sources"] = stage.sources
        elif isinstance(dfs, dict):
            data["sources"] = [{"model": dfs.get(f)} for f in ("model_a", "model_b") if dfs.get(f) is not None]
        if stage.optimizer is not None:
            data["optimizer"] = stage.optimizer
        if stage.fitness is not None:
            data["fitness"] = {**data["fitness"], **stage.fitness}
        if index < len(self.stages) - 1:
            # The next stage reads this stage's best model, so it must be written.
            data["output"] = {**data["output"], "materialise_best": True}
        return parse_run_config(data, source=where)

    def stage_refs(self, index: int) -> dict[str, int]:
        """``{field: earlier stage index}`` for the ``@`` references of stage `index`."""
        assert self.stages is not None
        dfs = self.stages[index].space.get("dfs")
        out: dict[str, int] = {}
        if isinstance(dfs, dict):
            for field in ("model_a", "model_b"):
                ref = dfs.get(field)
                if isinstance(ref, str) and ref.startswith(STAGE_REF):
                    out[field] = self.stage_index(ref, before=index)
        return out


def _deep_copy(value: Any) -> Any:
    return json.loads(json.dumps(value))


# --------------------------------------------------------------------------- loading


def load_run_config(path: str | Path) -> RunConfig:
    """Read a YAML run config and validate it (schema + static checks); raises ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file {path} does not exist; pass the path of a run config YAML")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    return parse_run_config(raw, source=str(path))


def parse_run_config(raw: Any, *, source: str = "config") -> RunConfig:
    """Validate a config dict (schema + static checks); raises ConfigError naming the field."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source} must be a YAML mapping with sources, space, optimizer and fitness")
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_friendly(exc)}") from None
    except ConfigError as exc:  # raised as is by validators (space.dfs), already naming the field
        raise ConfigError(f"{source}: {exc}") from None
    try:
        check_run_config(config)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return config


def template_fields(template: str) -> list[str]:
    """Column names a prompt template refers to."""
    return [f.split(".")[0].split("[")[0] for _, f, _, _ in string.Formatter().parse(template) if f]


# --------------------------------------------------------------------------- error messages


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that the location `loc` (excluding its last part) points into."""
    cls: Any = RunConfig
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            return None
        field = cls.model_fields.get(str(part))
        if field is None:
            return None
        cls = _unwrap_model(field.annotation)
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def _unwrap_model(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType, list):
        for arg in typing.get_args(annotation):
            found = _unwrap_model(arg)
            if isinstance(found, type) and issubclass(found, BaseModel):
                return found
        return None
    return annotation


def _friendly(exc: ValidationError) -> str:
    """One sentence for the first error: the dotted field, the problem and a fix."""
    err = exc.errors()[0]
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))
    # Drop union-branch tags pydantic inserts, e.g. 'literal['model']' or 'LayerGroups'.
    loc = tuple(p for p in loc if not (isinstance(p, str) and p and p[0].isupper() and p.isidentifier() and p not in _all_field_names()))
    field = ".".join(str(p) for p in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        parent = _model_at(loc[:-1])
        allowed = list(parent.model_fields) if parent else []
        hint = did_you_mean(loc[-1], allowed)
        where = ".".join(str(p) for p in loc[:-1]) or "the top level"
        return f"unknown key {field!r}{hint}; keys allowed in {where}: {', '.join(allowed)}"
    if err["type"] == "missing":
        return f"{field} is required; add it to the config"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    return f"{field}: {msg} (got {err.get('input')!r})"


def _all_field_names() -> set[str]:
    names: set[str] = set()
    for cls in (RunConfig, SourceSpec, LayerGroups, PSSpaceConfig, SpaceConfig, OptimizerConfig, DatasetSpec,
                FitnessConfig, RuntimeConfig, PublishConfig, OutputConfig, DFSSpaceConfig, StageConfig):
        names.update(cls.model_fields)
    return names


def dump_run_config(config: RunConfig) -> str:
    """The config as YAML (what a run stores as its frozen `config.yaml`)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
