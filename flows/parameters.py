"""Flows whose `config` parameter is a `RunConfig`, sent to the Prefect API with secrets masked.

A flow run's parameters are stored by the Prefect API and shown in its UI. The run config's
`storage_options` may hold credentials (s3fs `key`/`secret`): every secret value (as the run
store defines them, `evomerge_core.runs.storage.secret_values`: credential-named storage options
and credential environment variables) is replaced by ``***`` wherever it occurs in what is sent.
Other options (``endpoint_url``) stay, so a retried flow run still finds its storage when the
credentials come from the environment. The flow function itself receives the real config.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import Flow

from evomerge_core.runs.storage import redact, secret_values


def mask_secrets(config: Any) -> Any:
    """The serialised config with every secret value replaced by ``***``."""
    if not isinstance(config, dict):
        return config
    options = config.get("storage_options")
    secrets = secret_values(options if isinstance(options, dict) else None)

    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return redact(value, secrets) if isinstance(value, str) else value

    return walk(config) if secrets else config


class ConfigFlow(Flow):
    """A flow whose `config` parameter reaches the Prefect API with `mask_secrets` applied.
    (`with_options` returns a plain `Flow`, which would not mask.)"""

    def serialize_parameters(self, parameters: dict[str, Any]) -> dict[str, Any]:
        serialized = super().serialize_parameters(parameters)
        if "config" in serialized:
            serialized["config"] = mask_secrets(serialized["config"])
        return serialized


def config_flow(**options: Any) -> Callable[[Callable[..., Any]], ConfigFlow]:
    """Like `@prefect.flow(**options)`, for a flow that takes `config: RunConfig`."""
    return lambda fn: ConfigFlow(fn, **options)
