"""The optimizer: seeded CMA-ES ask/tell with a JSON-able state."""

# Stored optimizer states (pickled cma objects) refer to the generator wrapper as
# `evomerge_core.optim._GeneratorRandn`; the restricted unpickler resolves that name itself, and
# plain `pickle` (tools that inspect a state) finds it here.
from evomerge_core.optim.cmaes import _GeneratorRandn

__all__ = ["_GeneratorRandn"]
