"""The kinds of evolve run (`base.RunKind`): ``llm`` (PS over language models), ``vlm`` (PS over
a VLM's language model) and ``dfs`` (a layer path through two models), registered in
`base.RUN_KINDS`; `run_kind(config)` is the one lookup. Plus what they share: the worker's model
cache (`cache`), the candidate evaluator (`evaluate`) and the preflight checks (`preflight`)."""

from evomerge_core.kinds import dfs, llm, vlm  # noqa: F401  (importing registers the run kinds)
from evomerge_core.kinds.base import RUN_KINDS, RunKind, run_kind

__all__ = ["RUN_KINDS", "RunKind", "run_kind"]
