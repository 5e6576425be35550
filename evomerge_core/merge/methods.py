"""Merge methods: a registry (`METHODS`) of pure functions on tensors, with mergekit 0.1.5's
parameter names, defaults and semantics (see docs/merging.md). The arithmetic lives in
`evomerge_core.merge.kernels` (chunked, float32 inside, any float input dtype).

The task-vector family (task_arithmetic, ties, dare_ties, dare_linear) is data, as in mergekit:
each method is one `TaskVectorVariant` declaration (sparsification, consensus, the defaults of
`normalize` and `rescale`) served by the one function `merge_task_vectors`; a new member is one
`register_task_vector_method` line. Other methods register a function with `register_method`.

Every method function has the signature

    fn(tensors, *, base, model_params, params, generators, out=None) -> Tensor

- `tensors`: the inputs that carry per-model parameters, in recipe order (for methods with a
  base these are the non-base models; for `linear` every input, base included if listed);
- `base`: the base tensor (methods with `needs_base`), else None;
- `model_params`: one dict per entry of `tensors` (e.g. `weight`, `density`);
- `params`: the global parameters (`normalize`, `lambda`, `t`, ...);
- `generators`: one DARE seed per entry of `tensors` for stochastic methods: an int, or a
  `torch.Generator` that one seed is drawn from (None: torch's global RNG);
- `out`: where to write the result (any float dtype, the inputs' shape); None allocates float32.

Functions never modify their inputs and return the result (`out` when given). Parameters arrive already resolved for the tensor (per
model, per layer gradient, per name filter) by `evomerge_core.merge.params`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from evomerge_core.errors import MergeError
from evomerge_core.merge import kernels
from evomerge_core.merge.sparsify import Consensus, Sparsification, TaskVectorSpec, seed_from
from evomerge_core.registry import Registry


class _Required:
    """Marker for a parameter without a default (must be given in the recipe)."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()

# Inclusive valid ranges of numeric parameters, checked when a recipe is validated.
PARAM_RANGES: dict[str, tuple[float, float]] = {"density": (0.0, 1.0), "t": (0.0, 1.0)}

MethodFn = Callable[..., torch.Tensor]

# The global parameters of every task-vector method, with mergekit's defaults.
_TV_GLOBALS: Mapping[str, Any] = {"normalize": False, "lambda": 1.0, "int8_mask": False}


@dataclass(frozen=True)
class TaskVectorVariant:
    """One member of the task-vector family (mergekit's generalized task arithmetic):

        base + lambda * consensus_i(weight_i * sparsify_i(model_i - base)) [normalized]

    The fields say which; the method's parameters and their defaults follow from them.
    """

    sparsification: Sparsification = Sparsification.NONE
    consensus: Consensus = Consensus.NONE
    normalize: bool = False  # default of the `normalize` parameter
    rescale: bool = False  # default of the `rescale` parameter (L1 rescale of a sparsified vector)

    @property
    def sparsifies(self) -> bool:
        return self.sparsification is not Sparsification.NONE

    @property
    def model_params(self) -> tuple[str, ...]:
        return ("weight", "density") if self.sparsifies else ("weight",)

    @property
    def model_defaults(self) -> dict[str, Any]:
        return {"density": 1.0} if self.sparsifies else {}

    @property
    def global_params(self) -> dict[str, Any]:
        rescale = {"rescale": self.rescale} if self.sparsifies else {}
        return {**_TV_GLOBALS, "normalize": self.normalize, **rescale}

    @property
    def stochastic(self) -> bool:
        return self.sparsification is Sparsification.RANDOM


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method and the parameters it takes."""

    name: str
    fn: MethodFn
    needs_base: bool
    model_params: tuple[str, ...]
    model_defaults: Mapping[str, Any] = field(default_factory=dict)
    global_params: Mapping[str, Any] = field(default_factory=dict)
    stochastic: bool = False
    # Exactly this many non-base models (slerp: 1), or None for any number >= 1.
    num_models: int | None = None
    # Set for the task-vector family: the method is this declaration, `fn` its generic merge.
    task_vector: TaskVectorVariant | None = None

    def default_for(self, param: str) -> Any:
        """The default of a parameter, or REQUIRED."""
        if param in self.model_params:
            return self.model_defaults.get(param, REQUIRED)
        return self.global_params.get(param, REQUIRED)

    def __call__(
        self,
        tensors: Sequence[torch.Tensor],
        *,
        base: torch.Tensor | None = None,
        model_params: Sequence[Mapping[str, Any]] | None = None,
        params: Mapping[str, Any] | None = None,
        generators: Sequence[torch.Generator | int | None] | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Apply the method; missing parameters take their defaults (REQUIRED ones raise)."""
        model_params = model_params if model_params is not None else [{}] * len(tensors)
        if len(model_params) != len(tensors):
            raise MergeError(f"{self.name}: got {len(tensors)} tensors but {len(model_params)} parameter sets")
        full_models = [self._fill(dict(self.model_defaults), mp, self.model_params) for mp in model_params]
        full_global = self._fill(dict(self.global_params), params or {}, tuple(self.global_params))
        if self.needs_base and base is None:
            raise MergeError(f"merge method {self.name!r} needs a base model; set base_model in the recipe")
        gens = list(generators) if generators is not None else [None] * len(tensors)
        return self.fn(tensors, base=base, model_params=full_models, params=full_global, generators=gens, out=out)

    def _fill(self, out: dict[str, Any], given: Mapping[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
        out.update({k: v for k, v in given.items() if k in names})
        missing = [k for k in names if out.get(k, REQUIRED) is REQUIRED]
        if missing:
            raise MergeError(f"merge method {self.name!r} needs parameter {missing[0]!r}; add it to the recipe")
        return out


METHODS: Registry[MergeMethod] = Registry("merge method", error=MergeError)
MERGE_METHODS = METHODS  # the name callers and tests have used


def register_method(
    name: str,
    *,
    needs_base: bool,
    model_params: tuple[str, ...] = (),
    global_params: Mapping[str, Any] | None = None,
    model_defaults: Mapping[str, Any] | None = None,
    stochastic: bool = False,
    num_models: int | None = None,
) -> Callable[[MethodFn], MethodFn]:
    """Decorator registering `fn` as merge method `name` in METHODS."""

    def decorate(fn: MethodFn) -> MethodFn:
        METHODS.add(name, MergeMethod(
            name=name,
            fn=fn,
            needs_base=needs_base,
            model_params=tuple(model_params),
            model_defaults=dict(model_defaults or {}),
            global_params=dict(global_params or {}),
            stochastic=stochastic,
            num_models=num_models,
        ))
        return fn

    return decorate


def register_task_vector_method(name: str, variant: TaskVectorVariant) -> MergeMethod:
    """Register merge method `name` as a member of the task-vector family: no code, only the
    variant's fields (its parameters and defaults follow from them)."""
    return METHODS.add(name, MergeMethod(
        name=name,
        fn=functools.partial(merge_task_vectors, variant=variant),
        needs_base=True,
        model_params=variant.model_params,
        model_defaults=variant.model_defaults,
        global_params=variant.global_params,
        stochastic=variant.stochastic,
        task_vector=variant,
    ))


def get_method(name: str) -> MergeMethod:
    """The registered method `name`; raises MergeError with a suggestion for unknown names."""
    if name in METHODS:
        return METHODS.get(name)
    close = METHODS.close_match(name)
    hint = f" (did you mean {close!r}?)" if close else ""
    raise MergeError(f"unknown merge method {name!r}{hint}; supported methods: {', '.join(METHODS.names())}")


# --------------------------------------------------------------------------- building blocks


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask keeping the `max(1, int(density * numel))` entries of largest |delta|.

    density >= 1 keeps everything, density <= 0 keeps nothing. Exact count by selection,
    never a full sort; ties at the threshold are taken lowest index first.
    """
    n = delta.numel()
    k = kernels.magnitude_k(float(density), n)
    if k >= n:
        return torch.ones_like(delta, dtype=torch.bool)
    if k == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    flat = delta.detach().reshape(-1).to(torch.float32)
    keys = flat.to(torch.bfloat16).view(torch.int16).bitwise_and(0x7FFF)
    cut = kernels.magnitude_cut(keys, k, lambda idx: flat[idx].abs())
    mags = flat.abs()
    idx = torch.arange(n, device=flat.device)
    mask = (mags > cut.threshold) | ((mags == cut.threshold) & (idx < cut.cut))
    return mask.reshape(delta.shape)


def bernoulli_mask(delta: torch.Tensor, density: float, generator: torch.Generator | int | None) -> torch.Tensor:
    """Boolean mask keeping each entry independently with probability `density` (DARE).

    `generator`: an int seed, or a torch.Generator that one seed is drawn from (None: torch's
    global RNG). The mask is the one the DARE kernels use for that seed (`kernels.dare_mask`).
    """
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    return kernels.dare_mask(delta.shape, density, seed_from(generator), delta.device)


def rescale_l1(masked: torch.Tensor, original: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Scale `masked` so its L1 norm equals the L1 norm of `original` (mergekit's DARE rescale).

    Left unscaled when either norm is below `eps` (nothing to rescale or nothing kept).
    """
    before = original.abs().sum()
    after = masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def merge_task_vectors(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor,
    model_params: Sequence[Mapping[str, Any]],
    params: Mapping[str, Any],
    generators: Sequence[Any],
    out: torch.Tensor | None = None,
    variant: TaskVectorVariant,
) -> torch.Tensor:
    """The task-vector family's one merge: sparsify (model - base), weight, combine by the
    variant's consensus, normalize, lambda, + base (see `kernels.task_vector_merge`)."""
    random = variant.sparsification is Sparsification.RANDOM
    specs = []
    for mp, gen in zip(model_params, generators):
        density = float(mp.get("density", 1.0))
        seed = seed_from(gen) if random and density < 1 else None
        specs.append(TaskVectorSpec(weight=float(mp["weight"]), density=density, seed=seed))
    return kernels.task_vector_merge(
        base,
        list(tensors),
        specs,
        sparsification=variant.sparsification.kernel_name,
        consensus=variant.consensus is Consensus.SIGN,
        normalize=bool(params["normalize"]),
        lam=float(params["lambda"]),
        rescale=bool(params.get("rescale", False)),
        out=out,
    )


# --------------------------------------------------------------------------- methods


@register_method("linear", needs_base=False, model_params=("weight",), global_params={"normalize": True})
def linear(tensors, *, base, model_params, params, generators, out=None):
    """Weighted sum of all inputs; divided by the sum of weights when `normalize`."""
    weights = [float(mp["weight"]) for mp in model_params]
    return kernels.linear_merge(list(tensors), weights, normalize=bool(params["normalize"]), out=out)


# The task-vector family, as data (mergekit's names and defaults):
# task_arithmetic: base + lambda * sum_i weight_i * (model_i - base) [/ sum_i weight_i when normalize].
register_task_vector_method("task_arithmetic", TaskVectorVariant())
# TIES: keep the top-`density` |delta| per model, elect signs by the sum, average the agreeing.
register_task_vector_method("ties", TaskVectorVariant(Sparsification.MAGNITUDE, Consensus.SIGN, normalize=True))
# DARE random drop (keep probability `density`, L1 rescale), then TIES sign election ...
register_task_vector_method("dare_ties", TaskVectorVariant(Sparsification.RANDOM, Consensus.SIGN, rescale=True))
# ... or a plain weighted sum.
register_task_vector_method("dare_linear", TaskVectorVariant(Sparsification.RANDOM, rescale=True))


def slerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation of two whole tensors (as flat vectors) at position t, float32.

    The angle comes from the normalised tensors (float64); the result combines the original
    tensors. Nearly (anti)parallel inputs (|cos| > dot_threshold) interpolate linearly.
    """
    c0, c1 = kernels.slerp_coefficients(float(t), v0, v1, dot_threshold, eps)
    return kernels.scaled_sum(v0, c0, v1, c1)


@register_method("slerp", needs_base=True, model_params=(), global_params={"t": REQUIRED}, num_models=1)
def slerp(tensors, *, base, model_params, params, generators, out=None):
    """SLERP from the base (t=0) to the one other model (t=1)."""
    if len(tensors) != 1:
        raise MergeError(f"slerp merges exactly two models (the base and one other), got {len(tensors) + 1}")
    return kernels.slerp_merge(float(params["t"]), base, tensors[0], out=out)
