"""Docs examples are tested as written: run one ```python block of a docs page and see what it
registered."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from evomerge_core.registry import Registry

DOCS = Path(__file__).resolve().parents[1] / "docs"


@contextmanager
def registered_by_doc_example(page: str, marker: str, registry: Registry) -> Iterator[set[str]]:
    """Execute the first python block of docs/`page` that contains `marker`; yields the names it
    added to `registry`, which are removed again on exit."""
    doc = DOCS / page
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(encoding="utf-8"), flags=re.S)
    example = next(b for b in blocks if marker in b)
    before = set(registry)
    exec(compile(example, str(doc), "exec"), {})
    added = set(registry) - before
    try:
        yield added
    finally:
        for name in added:
            registry.remove(name)
