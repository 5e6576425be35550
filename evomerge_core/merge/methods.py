"""Merge methods: a registry of pure functions on float32 tensors, with mergekit 0.1.5's
parameter names, defaults and semantics (see docs/merging.md).

Every method function has the signature

    fn(tensors, *, base, model_params, params, generators) -> Tensor

- `tensors`: the inputs that carry per-model parameters, in recipe order (for methods with a
  base these are the non-base models; for `linear` every input, base included if listed);
- `base`: the base tensor (methods with `needs_base`), else None;
- `model_params`: one dict per entry of `tensors` (e.g. `weight`, `density`);
- `params`: the global parameters (`normalize`, `lambda`, `t`, ...);
- `generators`: one `torch.Generator` per entry of `tensors` for stochastic methods, else Nones.

Functions never modify their inputs. Parameters arrive already resolved for the tensor (per
model, per layer gradient, per name filter) by `evomerge_core.merge.params`.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from evomerge_core.errors import MergeError


class _Required:
    """Marker for a parameter without a default (must be given in the recipe)."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()

# Inclusive valid ranges of numeric parameters, checked when a recipe is validated.
PARAM_RANGES: dict[str, tuple[float, float]] = {"density": (0.0, 1.0), "t": (0.0, 1.0)}

MethodFn = Callable[..., torch.Tensor]


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
        generators: Sequence[torch.Generator | None] | None = None,
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
        return self.fn(tensors, base=base, model_params=full_models, params=full_global, generators=gens)

    def _fill(self, out: dict[str, Any], given: Mapping[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
        out.update({k: v for k, v in given.items() if k in names})
        missing = [k for k in names if out.get(k, REQUIRED) is REQUIRED]
        if missing:
            raise MergeError(f"merge method {self.name!r} needs parameter {missing[0]!r}; add it to the recipe")
        return out


MERGE_METHODS: dict[str, MergeMethod] = {}


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
    """Decorator registering `fn` as merge method `name` in MERGE_METHODS."""

    def decorate(fn: MethodFn) -> MethodFn:
        if name in MERGE_METHODS:
            raise ValueError(f"merge method {name!r} is already registered")
        MERGE_METHODS[name] = MergeMethod(
            name=name,
            fn=fn,
            needs_base=needs_base,
            model_params=tuple(model_params),
            model_defaults=dict(model_defaults or {}),
            global_params=dict(global_params or {}),
            stochastic=stochastic,
            num_models=num_models,
        )
        return fn

    return decorate


def get_method(name: str) -> MergeMethod:
    """The registered method `name`; raises MergeError with a suggestion for unknown names."""
    try:
        return MERGE_METHODS[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), MERGE_METHODS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        known = ", ".join(sorted(MERGE_METHODS))
        raise MergeError(f"unknown merge method {name!r}{hint}; supported methods: {known}") from None


# --------------------------------------------------------------------------- building blocks


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask keeping the `max(1, int(density * numel))` entries of largest |delta|.

    density >= 1 keeps everything, density <= 0 keeps nothing. Exact count via selection
    (`kthvalue`), never a full sort; ties at the threshold are taken lowest index first.
    """
    n = delta.numel()
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    if density <= 0 or n == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    k = max(1, int(density * n))
    flat = delta.detach().abs().reshape(-1)
    threshold = torch.kthvalue(flat, n - k + 1).values  # the k-th largest magnitude
    mask = flat > threshold
    need = k - int(mask.sum())
    if need > 0:  # entries equal to the threshold fill up to exactly k, lowest index first
        mask[(flat == threshold).nonzero().squeeze(1)[:need]] = True
    return mask.reshape(delta.shape)


def bernoulli_mask(delta: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """Boolean mask keeping each entry independently with probability `density` (DARE)."""
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    noise = torch.rand(delta.shape, generator=generator, device=delta.device, dtype=torch.float32)
    return noise < density


def rescale_l1(masked: torch.Tensor, original: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Scale `masked` so its L1 norm equals the L1 norm of `original` (mergekit's DARE rescale).

    Left unscaled when either norm is below `eps` (nothing to rescale or nothing kept).
    """
    before = original.abs().sum()
    after = masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def sparsify(
    delta: torch.Tensor,
    density: float,
    how: str,
    *,
    rescale: bool,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sparsify a task vector by `magnitude` (TIES) or `random` (DARE) to `density`.

    Returns `delta` itself when density >= 1 (nothing dropped, no rescale), else a new tensor.
    """
    if density >= 1:
        return delta
    return _sparsify_(delta.clone(), density, how, rescale=rescale, generator=generator)


def _sparsify_(delta: torch.Tensor, density: float, how: str, *, rescale: bool, generator: torch.Generator | None) -> torch.Tensor:
    """In-place `sparsify` on a tensor the caller owns (saves one full-size copy)."""
    if density >= 1:
        return delta
    mask = magnitude_mask(delta, density) if how == "magnitude" else bernoulli_mask(delta, density, generator)
    before = delta.abs().sum() if rescale else None
    delta.mul_(mask)
    del mask
    if before is not None:
        after = delta.abs().sum()
        if before >= 1e-7 and after >= 1e-7:  # same rule as rescale_l1
            delta.mul_(before / after)
    return delta


def _task_vector_merge(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    model_params: Sequence[Mapping[str, Any]],
    params: Mapping[str, Any],
    generators: Sequence[torch.Generator | None],
    *,
    sparsification: str | None,
    consensus: bool,
) -> torch.Tensor:
    """The task-vector family: sparsify (model - base), weight, elect signs, normalize, lambda.

    Works in place on its own intermediate tensors so memory stays near (models + 2) copies.
    """
    if not tensors:
        return base.clone()
    weighted: list[torch.Tensor] = []
    weights: list[float] = []
    for tensor, mp, gen in zip(tensors, model_params, generators):
        delta = tensor - base
        if sparsification is not None:
            _sparsify_(delta, float(mp["density"]), sparsification, rescale=bool(params["rescale"]), generator=gen)
        weight = float(mp["weight"])
        weighted.append(delta.mul_(weight))
        weights.append(weight)
        del delta
    mixed = weighted[0].clone()
    for delta in weighted[1:]:
        mixed.add_(delta)
    if consensus:
        # TIES sign election ("sum"): the sign of the summed weighted deltas, >= 0 counts as +.
        positive = mixed >= 0
        mixed.zero_()
        divisor = torch.zeros_like(base)
        for delta, weight in zip(weighted, weights):
            keep = torch.where(positive, delta > 0, delta < 0)  # zeros never agree
            mixed.add_(delta.mul_(keep))
            divisor.add_(keep, alpha=weight)
            del keep
        del positive
        divisor[divisor == 0] = 1.0
    else:
        wsum = sum(weights)
        divisor = torch.tensor(1.0 if abs(wsum) < 1e-8 else wsum, dtype=base.dtype, device=base.device)
    del weighted
    if params["normalize"]:
        mixed.div_(divisor)
    del divisor
    lam = float(params["lambda"])
    if lam != 1:
        mixed.mul_(lam)
    return mixed.add_(base)


# --------------------------------------------------------------------------- methods


@register_method("linear", needs_base=False, model_params=("weight",), global_params={"normalize": True})
def linear(tensors, *, base, model_params, params, generators):
    """Weighted sum of all inputs; divided by the sum of weights when `normalize`."""
    weights = [float(mp["weight"]) for mp in model_params]
    result = torch.zeros_like(tensors[0], dtype=torch.float32)
    for tensor, weight in zip(tensors, weights):
        result.add_(tensor, alpha=weight)
    if params["normalize"]:
        total = sum(weights)
        if total == 0:
            raise MergeError("linear merge with normalize: true needs weights that do not sum to 0; change the weights or set normalize: false")
        result.div_(total)
    return result


_TV_GLOBALS = {"normalize": False, "lambda": 1.0, "int8_mask": False}


@register_method(
    "task_arithmetic", needs_base=True, model_params=("weight",), global_params=_TV_GLOBALS
)
def task_arithmetic(tensors, *, base, model_params, params, generators):
    """base + lambda * sum_i weight_i * (model_i - base) [/ sum_i weight_i when normalize]."""
    return _task_vector_merge(tensors, base, model_params, params, generators, sparsification=None, consensus=False)


@register_method(
    "ties",
    needs_base=True,
    model_params=("weight", "density"),
    model_defaults={"density": 1.0},
    global_params={**_TV_GLOBALS, "normalize": True, "rescale": False},
)
def ties(tensors, *, base, model_params, params, generators):
    """TIES: keep the top-`density` |delta| per model, elect signs by sum, average agreeing."""
    return _task_vector_merge(tensors, base, model_params, params, generators, sparsification="magnitude", consensus=True)


@register_method(
    "dare_ties",
    needs_base=True,
    model_params=("weight", "density"),
    model_defaults={"density": 1.0},
    global_params={**_TV_GLOBALS, "rescale": True},
    stochastic=True,
)
def dare_ties(tensors, *, base, model_params, params, generators):
    """DARE random drop (keep prob `density`, L1 rescale) followed by TIES sign election."""
    return _task_vector_merge(tensors, base, model_params, params, generators, sparsification="random", consensus=True)


@register_method(
    "dare_linear",
    needs_base=True,
    model_params=("weight", "density"),
    model_defaults={"density": 1.0},
    global_params={**_TV_GLOBALS, "rescale": True},
    stochastic=True,
)
def dare_linear(tensors, *, base, model_params, params, generators):
    """DARE random drop (keep prob `density`, L1 rescale), then a weighted task-vector sum."""
    return _task_vector_merge(tensors, base, model_params, params, generators, sparsification="random", consensus=False)


def slerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation of two whole tensors (as flat vectors) at position t.

    The angle comes from the normalised tensors; the result combines the original tensors.
    Nearly (anti)parallel inputs (|cos| > dot_threshold) fall back to linear interpolation.
    """
    a = v0.reshape(-1).to(torch.float64)
    b = v1.reshape(-1).to(torch.float64)
    na = torch.linalg.vector_norm(a)
    nb = torch.linalg.vector_norm(b)
    na = na if na > eps else torch.ones_like(na)
    nb = nb if nb > eps else torch.ones_like(nb)
    dot = float(torch.clamp(torch.dot(a / na, b / nb), -1.0, 1.0)) if a.numel() else 1.0
    del a, b
    if abs(dot) > dot_threshold:
        c0, c1 = 1.0 - t, t
    else:
        theta = math.acos(dot)
        sin_theta = math.sin(theta)
        c0 = math.sin((1.0 - t) * theta) / sin_theta
        c1 = math.sin(t * theta) / sin_theta
    return v0 * c0 + v1 * c1


@register_method("slerp", needs_base=True, model_params=(), global_params={"t": REQUIRED}, num_models=1)
def slerp(tensors, *, base, model_params, params, generators):
    """SLERP from the base (t=0) to the one other model (t=1)."""
    if len(tensors) != 1:
        raise MergeError(f"slerp merges exactly two models (the base and one other), got {len(tensors) + 1}")
    return slerp_tensors(float(params["t"]), base, tensors[0])
