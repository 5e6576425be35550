"""`evomerge_sources.json`: which sources a merged model was built from, without local paths.

`evomerge merge` resolves a Hub id given without `@revision` to a snapshot whose directory name
is the commit; that commit is recorded here so the model card can name it later (publishing
happens in another process that no longer knows the snapshot). Only Hub sources are recorded, so
the file holds no local paths.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

from evomerge_core.publish.licenses import describe_source

SOURCES_FILE = "evomerge_sources.json"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def source_record(sources: Mapping[str, Path]) -> dict[str, dict[str, Any]]:
    """`{ref: {"repo_id", "commit"}}` for each Hub source (commit None when unknown); local
    sources are left out (the card names them by their directory name)."""
    record = {}
    for ref, path in sources.items():
        src = describe_source(ref, path)
        if not src.repo_id or Path(ref).expanduser().exists():
            continue  # a local directory (a Hub snapshot path names its commit itself)
        commit = _snapshot_commit(Path(path)) or (src.revision if src.revision and _COMMIT.match(src.revision) else None)
        record[ref] = {"repo_id": src.repo_id, "commit": commit}
    return record


def _snapshot_commit(path: Path) -> str | None:
    """The commit of a huggingface_hub snapshot directory (`.../snapshots/<sha>`), else None."""
    path = Path(path)
    if path.parent.name == "snapshots" and _COMMIT.match(path.name):
        return path.name
    return None


def write_source_record(model_dir: Path, sources: Mapping[str, Path]) -> None:
    """Write `evomerge_sources.json` into a model directory being built."""
    (Path(model_dir) / SOURCES_FILE).write_text(json.dumps(source_record(sources), indent=2) + "\n")


def read_source_record(model_dir: Path) -> dict[str, dict[str, Any]]:
    """The model directory's source record (`{}` when it has none or it is unreadable)."""
    try:
        data = json.loads((Path(model_dir) / SOURCES_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}
