"""The kind of an evolve run as one object: `RunKind` (what differs between PS over LLMs, PS
over a VLM's language model and DFS), the `RUN_KINDS` registry of its implementations
(`kinds.llm`, `kinds.vlm`, `kinds.dfs`, registered when `evomerge_core.kinds` is imported) and
`run_kind(config)`, the one lookup. Adding a run kind is one class registered here.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from threading import RLock
from typing import Any, Protocol

from evomerge_core.config.run_kind import kind_name
from evomerge_core.config.schema import RunConfig
from evomerge_core.errors import ConfigError
from evomerge_core.registry import Registry
from evomerge_core.runs.store import RunStore
from evomerge_core.spaces import SearchSpace


class Resident(Protocol):
    """The worker's model that candidates are applied to (merged in place, or run as a layer
    path); hold `lock` from `apply` until scoring is done. A VLM's also has `processor`."""

    lock: RLock
    model: Any
    tokenizer: Any

    def apply(self, recipe: Any) -> None: ...


class RunKind(Protocol):
    """What one kind of evolve run does differently (see docs/architecture.md)."""

    name: str

    def resolve_sources(self, config: RunConfig) -> dict[str, Any]:
        """Resolve the sources to local dirs and check they fit together:
        ``{"paths": {ref: dir}, "num_layers", "architecture"}`` (DFS: also ``num_layers_b``)."""
        ...

    def num_layers(self, config: RunConfig, paths: Mapping[str, str]) -> int:
        """The layer count the space is built on, read from resolved local dirs."""
        ...

    def build_space(self, config: RunConfig, paths: Mapping[str, str]) -> SearchSpace:
        """The search space over resolved local dirs."""
        ...

    def open_model(self, config: RunConfig, paths: Mapping[str, str]) -> Resident:
        """This worker's resident model (`kinds.cache`: one per worker)."""
        ...

    def check_local(self, config: RunConfig) -> None:
        """Preflight checks on sources that are local dirs already, nothing resolved or loaded."""
        ...

    def check_resolved(self, config: RunConfig, paths: Mapping[str, str]) -> None:
        """Preflight checks on the resolved sources that a worker would otherwise meet per candidate."""
        ...

    def check_stage_source(self, path: Path, ref: str) -> None:
        """Preflight check of a later chained stage's directly named source."""
        ...

    def materialise_best(self, config: RunConfig, paths: Mapping[str, str], num_layers: int,
                         genome: Sequence[float], store: RunStore) -> str:
        """Write the genome's model as ``best/`` in the run store; returns its URL."""
        ...


RUN_KINDS: Registry[RunKind] = Registry("run kind", error=ConfigError)


def run_kind(config: RunConfig) -> RunKind:
    """The run kind of a config (a chained run: of one stage's config)."""
    return RUN_KINDS.get(kind_name(config))


def publish_best(store: RunStore, write_model: Callable[[Path], Path], files: Callable[[], Mapping[str, str]],
                 relpath: str = "best") -> str:
    """Write a model dir in a temp dir (`write_model(dir)` returns it), add `files()` (name ->
    text: the recipe and what goes beside it), publish it at `relpath` and return its URL."""
    with tempfile.TemporaryDirectory(prefix="evomerge-best-") as tmp:
        out = write_model(Path(tmp) / "best")
        for name, text in files().items():
            (out / name).write_text(text)
        store.put_dir(out, relpath)
    return store.url(relpath)
