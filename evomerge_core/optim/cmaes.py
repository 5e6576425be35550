"""CMA-ES (the `cma` package) behind a small ask/tell wrapper that maximises fitness.

- Seeded without touching numpy's global random state: samples come from a private
  `numpy.random.Generator` passed to `cma` as its ``randn`` option (and ``seed=nan`` tells `cma`
  not to reseed the global state).
- Bounded: `cma`'s ``BoundTransform`` keeps every candidate inside ``[lower, upper]``; the
  per-coordinate spread is ``sigma0 * (upper - lower)`` (``CMA_stds``), so ``sigma0`` is in units
  of the range, as in the paper (bounds [0, 1], sigma0 1/6).
- `state_dict()` is JSON-able: the `cma` object is pickled, base64-encoded, and
  `load_state_dict()` reads it back with a restricted unpickler that only builds `cma` classes,
  numpy arrays and this module's generator wrapper (no arbitrary code from a stored file).
"""

from __future__ import annotations

import base64
import io
import math
import pickle
import warnings
from collections.abc import Sequence
from typing import Any

import cma
import numpy as np

from evomerge_core.errors import ConfigError, StorageError

STATE_FORMAT = "evomerge-cma-v1"


def default_popsize(n: int) -> int:
    """CMA-ES default population size: 4 + floor(3 ln n)."""
    return 4 + int(math.floor(3 * math.log(n)))


class _GeneratorRandn:
    """`randn(*shape)` drawing from a private, seeded numpy Generator (picklable)."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def __call__(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape)

    def __getstate__(self) -> dict[str, Any]:
        return {"bit_generator": self.rng.bit_generator.state}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.rng = np.random.Generator(np.random.PCG64())
        self.rng.bit_generator.state = state["bit_generator"]


# Stored optimizer states name the generator wrapper by the module it was pickled under: run
# stores written before the core was regrouped say `evomerge_core.optim` (then a module), and the
# wrapper keeps that name so states written now are byte-identical to theirs.
_GeneratorRandn.__module__ = "evomerge_core.optim"
_GENERATOR_MODULES = {"evomerge_core.optim", __name__}

# Functions (not classes) that a pickled CMAEvolutionStrategy refers to.
_ALLOWED_FUNCTIONS = {
    ("numpy.linalg", "eigh"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "scalar"),
    ("cma.evolution_strategy", "_pass"),
    ("cma.options_parameters", "is_feasible"),
    # harmless builtin containers (cma's integer-variable handler keeps a `range`)
    ("builtins", "range"),
    ("builtins", "slice"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "complex"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds only cma classes, numpy arrays/dtypes and our generator wrapper."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_FUNCTIONS:
            return super().find_class(module, name)
        if module in _GENERATOR_MODULES and name == "_GeneratorRandn":
            return _GeneratorRandn
        if (module, name) in {("numpy", "dtype"), ("numpy", "ndarray")} or (
            module.startswith("numpy.dtypes") and name.endswith("DType")
        ):
            return super().find_class(module, name)
        if module == "cma" or module.startswith("cma."):
            obj = super().find_class(module, name)
            if isinstance(obj, type):
                return obj
        raise pickle.UnpicklingError(f"optimizer state refers to {module}.{name}, which is not allowed")


class CMAES:
    """Maximising, seeded, bounded CMA-ES with ask/tell and a JSON-able state."""

    def __init__(
        self,
        x0: Sequence[float],
        *,
        sigma0: float,
        lower: Sequence[float],
        upper: Sequence[float],
        popsize: int | None = None,
        seed: int = 0,
    ) -> None:
        x0 = [float(v) for v in x0]
        lower = [float(v) for v in lower]
        upper = [float(v) for v in upper]
        n = len(x0)
        if n < 1:
            raise ConfigError("the search space has no parameters to evolve; list at least one in space.ps.params")
        if len(lower) != n or len(upper) != n:
            raise ConfigError(f"bounds have {len(lower)}/{len(upper)} entries for a genome of {n}")
        for i, (lo, hi, x) in enumerate(zip(lower, upper, x0)):
            if not lo < hi:
                raise ConfigError(f"bounds of genome entry {i} are reversed or empty ({lo} >= {hi})")
            if not lo <= x <= hi:
                raise ConfigError(f"initial point entry {i} ({x}) lies outside its bounds [{lo}, {hi}]")
        if sigma0 <= 0:
            raise ConfigError(f"optimizer.sigma0 must be positive, got {sigma0}")
        self.dim = n
        self.lower = np.asarray(lower)
        self.upper = np.asarray(upper)
        self.popsize = int(popsize) if popsize else default_popsize(n)
        opts = {
            "bounds": [lower, upper],
            "CMA_stds": [hi - lo for lo, hi in zip(lower, upper)],
            "popsize": self.popsize,
            "seed": float("nan"),  # do not (re)seed numpy's global state
            "randn": _GeneratorRandn(seed),
            "verbose": -9,
            "verb_log": 0,
            "verb_disp": 0,
            "tolfun": 0,
            "tolfunhist": 0,
            "tolx": 0,
            "tolflatfitness": 10**9,  # flat fitness (all-equal accuracy) is common; never stop on it
            "maxiter": 10**9,
            "maxfevals": 10**12,
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._es = cma.CMAEvolutionStrategy(x0, float(sigma0), opts)
        self._pending: list[np.ndarray] | None = None
        self._pending_raw: list[np.ndarray] = []
        self.best_genome: list[float] | None = None
        self.best_fitness: float | None = None
        self.generation = 0

    def ask(self) -> list[list[float]]:
        """Propose one generation of candidates, each inside the bounds."""
        if self._pending is not None:
            return [self._to_list(x) for x in self._pending]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            xs = self._es.ask()
        # BoundTransform already keeps candidates inside the bounds; clip guards float round-off.
        self._pending = [np.clip(np.asarray(x, dtype=float), self.lower, self.upper) for x in xs]
        self._pending_raw = [np.asarray(x, dtype=float) for x in xs]
        return [self._to_list(x) for x in self._pending]

    def tell(self, genomes: Sequence[Sequence[float]], fitnesses: Sequence[float]) -> None:
        """Report the fitness (higher is better, finite) of the genomes last returned by `ask`."""
        if self._pending is None:
            raise RuntimeError("tell() without a preceding ask()")
        if len(genomes) != len(self._pending) or len(fitnesses) != len(genomes):
            raise ValueError("tell() needs exactly the asked genomes and one fitness each")
        for given, asked in zip(genomes, self._pending):
            if not np.allclose(np.asarray(given, dtype=float), asked, rtol=0, atol=0):
                raise ValueError("tell() got genomes that differ from the ones asked for")
        values = [float(f) for f in fitnesses]
        if not all(math.isfinite(v) for v in values):
            raise ValueError("tell() needs finite fitness values (record failures with a finite worst value)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._es.tell(self._pending_raw, [-v for v in values])
        for x, v in zip(self._pending, values):
            if self.best_fitness is None or v > self.best_fitness:
                self.best_fitness, self.best_genome = v, self._to_list(x)
        self._pending = None
        self.generation += 1

    @staticmethod
    def _to_list(x: np.ndarray) -> list[float]:
        return [float(v) for v in x]

    @property
    def mean(self) -> list[float]:
        """Current mean of the search distribution (inside the bounds)."""
        return self._to_list(np.clip(self._es.mean, self.lower, self.upper))

    def state_dict(self) -> dict[str, Any]:
        """A JSON-able snapshot from which `load_state_dict` continues identically."""
        return {
            "format": STATE_FORMAT,
            "cma_version": cma.__version__,
            "generation": self.generation,
            "popsize": self.popsize,
            "lower": self._to_list(self.lower),
            "upper": self._to_list(self.upper),
            "best_genome": self.best_genome,
            "best_fitness": self.best_fitness,
            "pending": None if self._pending is None else [self._to_list(x) for x in self._pending],
            "pending_raw": [self._to_list(x) for x in self._pending_raw] if self._pending is not None else None,
            "cma_pickle_b64": base64.b64encode(pickle.dumps(self._es, protocol=4)).decode("ascii"),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> CMAES:
        """Rebuild an optimizer from `state_dict()` output."""
        if state.get("format") != STATE_FORMAT:
            raise StorageError(f"optimizer state has format {state.get('format')!r}, expected {STATE_FORMAT!r}")
        self = cls.__new__(cls)
        try:
            raw = base64.b64decode(state["cma_pickle_b64"])
            es = _RestrictedUnpickler(io.BytesIO(raw)).load()
        except (pickle.UnpicklingError, KeyError, ValueError, AttributeError, ImportError) as exc:
            raise StorageError(f"cannot read the stored optimizer state ({exc}); the run's state file is damaged") from exc
        if not isinstance(es, cma.CMAEvolutionStrategy):
            raise StorageError("stored optimizer state is not a CMA-ES state")
        self._es = es
        self.dim = len(state["lower"])
        self.lower = np.asarray(state["lower"], dtype=float)
        self.upper = np.asarray(state["upper"], dtype=float)
        self.popsize = int(state["popsize"])
        self.generation = int(state["generation"])
        self.best_genome = state.get("best_genome")
        self.best_fitness = state.get("best_fitness")
        pending = state.get("pending")
        self._pending = None if pending is None else [np.asarray(x, dtype=float) for x in pending]
        self._pending_raw = [np.asarray(x, dtype=float) for x in (state.get("pending_raw") or [])]
        return self

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace this optimizer's state with a stored one."""
        other = CMAES.from_state_dict(state)
        self.__dict__.update(other.__dict__)
