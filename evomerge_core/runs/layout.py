"""Where a config's run lives: its run store (storage URL + effective run key), the name of its
result object and the config as frozen in the store. Both the search bookkeeping
(runs/search.py) and resuming (runs/resume.py) start from here."""

from __future__ import annotations

from typing import Any

from evomerge_core.config.schema import RunConfig
from evomerge_core.runs.store import RunStore

RESULT = "result.json"


def open_store(config: RunConfig) -> RunStore:
    """The run store of a config (storage URL + effective run key)."""
    return RunStore(config.storage, config.effective_run_key(), storage_options=config.storage_options or None)


def stored_config(config: RunConfig) -> dict[str, Any]:
    """The config as frozen in the run store (storage options, which may hold secrets, left out)."""
    data = config.model_dump(mode="json", exclude={"storage_options"})
    data["run_key"] = config.effective_run_key()
    return data
