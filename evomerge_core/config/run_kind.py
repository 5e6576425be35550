"""Which kind of run a config describes: the one place that decides it (`kinds.run_kind`
maps the name to its implementation; config-time checks below the kinds use the name)."""

from __future__ import annotations

from typing import Any, Literal

KindName = Literal["llm", "vlm", "dfs"]


def kind_name(config: Any) -> KindName:
    """``dfs`` for a DFS space, ``vlm`` for a PS space over a VLM's language model (a source
    marked ``vlm: true``), else ``llm`` (PS over language models). A chained run's kinds are
    its stages' (`RunConfig.stage_config`)."""
    if config.space.kind == "dfs":
        return "dfs"
    return "vlm" if config.vlm is not None else "llm"
