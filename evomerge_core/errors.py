"""Error types. Every user-facing failure is one of these: one clear sentence naming the
problem and the fix. The CLI prints `error: <message>` and exits with `exit_code`."""

from __future__ import annotations


class EvomergeError(Exception):
    """Base class for expected, user-facing errors."""

    exit_code: int = 1


class UsageError(EvomergeError):
    """Bad command-line usage or a bad config file (exit code 2)."""

    exit_code = 2


class ConfigError(UsageError):
    """A config (run config, recipe or mergekit YAML) is invalid."""


class SourceError(EvomergeError):
    """A source model cannot be resolved, read or merged with the others."""

    exit_code = 2


class MergeError(EvomergeError):
    """A merge could not be carried out (bad parameters, incompatible tensors)."""

    exit_code = 2


class StorageError(EvomergeError):
    """The run store (file:// or s3://) cannot be read or written."""


class StorageURLError(StorageError, UsageError):
    """A storage URL is malformed or uses an unsupported form (bad input: exit code 2)."""


def is_bad_input(exc: BaseException) -> bool:
    """True for an error the user must fix in the input (exit code 2, docs/reliability.md "Exit
    codes"): running the same thing again, or retrying it, cannot help."""
    return isinstance(exc, EvomergeError) and exc.exit_code == 2
