"""The one worker-side cache: the resident model that candidates are merged into (any run
kind: `ResidentModel`, `ResidentVLM`, `DataflowModel`) and the evaluator that wraps it.

Policy (memory): each slot holds at most one entry. A miss in a slot drops that slot's entry,
and every slot after it (an evaluator wraps the model before it), *before* loading the new one,
so a worker never holds two models. Mapped tasks run in threads of one process, so the cache is
guarded by one re-entrant lock (an evaluator's build loads its model through the cache).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

T = TypeVar("T")

MODEL = "model"
EVALUATOR = "evaluator"


class WorkerCache:
    """Named slots, in dependency order, of one entry each (see the module docstring)."""

    def __init__(self, slots: tuple[str, ...]) -> None:
        self.slots = slots
        self._entries: dict[str, tuple[Hashable, Any]] = {}
        self._lock = threading.RLock()

    def get(self, slot: str, key: Hashable, load: Callable[[], T]) -> T:
        """The entry of `slot` for `key`, loaded by `load()` on a miss (after dropping the
        slot's old entry and every later slot's)."""
        if slot not in self.slots:
            raise ValueError(f"unknown cache slot {slot!r}; slots: {', '.join(self.slots)}")
        with self._lock:
            found = self._entries.get(slot)
            if found is not None and found[0] == key:
                return found[1]
            for later in self.slots[self.slots.index(slot):]:
                self._entries.pop(later, None)
            value = load()
            self._entries[slot] = (key, value)
            return value

    def held(self, slot: str) -> Any:
        """The entry `slot` holds now, or None."""
        with self._lock:
            found = self._entries.get(slot)
            return None if found is None else found[1]

    def clear(self) -> None:
        """Drop every entry (frees the resident model)."""
        with self._lock:
            self._entries.clear()


CACHE = WorkerCache((MODEL, EVALUATOR))


def cached_model(key: Hashable, load: Callable[[], T]) -> T:
    """This worker's resident model for `key` (kind, sources, dtype, device, ...), loaded on first use."""
    return CACHE.get(MODEL, key, load)


def clear_model_cache() -> None:
    """Forget the cached model and evaluator (tests, benchmarks; frees their memory)."""
    CACHE.clear()
