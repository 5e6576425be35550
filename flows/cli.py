"""`evomerge` command line: a thin dispatcher. Each subcommand lives in its own module
(`evomerge.flows.cmd_<name>`) exposing `add_arguments(parser)` and `run(args) -> int`."""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

from evomerge_core.errors import EvomergeError

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}  # disk full, quota, file-size limit

SUBCOMMANDS: dict[str, str] = {
    "merge": "One-shot merge from a mergekit YAML or an evomerge recipe into a model directory.",
    "evolve": "Run (or resume) an evolutionary merge search as a Prefect flow.",
    "demo": "Build the offline toy world and run the evolution end to end.",
    "publish": "Publish a model directory to the Hugging Face Hub.",
    "toyworld": "Build (or reuse) the offline toy world and copy it to ./toyworld (for examples/toyworld-ps.yaml).",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The CLI parser; with `only`, just that subcommand's module is imported (each pulls in
    torch/transformers/prefect, seconds apiece), the others are listed by name."""
    parser = argparse.ArgumentParser(prog="evomerge", description="Evolutionary model merging.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in SUBCOMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=help_text, description=help_text)
            continue
        module = _command_module(name)
        if module is None:
            continue
        sp = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sp)
        sp.set_defaults(_module=module)
    return parser


def _command_module(name: str):
    try:
        return importlib.import_module(f"evomerge.flows.cmd_{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"evomerge.flows.cmd_{name}":
            return None  # subcommand not built yet
        raise


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in given if not a.startswith("-")), None)
    # Without a known subcommand argparse only prints usage/help or an error: import none.
    parser = build_parser(only=chosen if chosen in SUBCOMMANDS else "")
    args = parser.parse_args(argv)
    try:
        return int(args._module.run(args) or 0)
    except EvomergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        if exc.errno not in _NO_SPACE:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"error: a write failed: {exc.strerror or exc}{where}; free disk space (or raise the quota or file-size "
              "limit) and run the same command again (nothing half-written is kept; evolve resumes where it stopped)",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
