"""`evomerge merge CONFIG.yaml OUT_DIR`: one-shot merge from a mergekit YAML or a recipe."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from pathlib import Path

from evomerge_core.io.model_dir import check_not_a_source, check_out_dir, remove_stale_temp_dirs
from evomerge_core.io.dtypes import parse_dtype
from evomerge_core.merge.engine import check_device, check_shard_size, merge_to_dir
from evomerge_core.sources.architectures import num_hidden_layers
from evomerge_core.errors import ConfigError
from evomerge_core.io.model_files import read_config
from evomerge_core.merge.mergekit_yaml import load_config
from evomerge_core.merge.params import plan_recipe
from evomerge_core.sources.resolve import resolve_source


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="mergekit YAML or evomerge recipe YAML")
    parser.add_argument("out_dir", type=Path, help="output model directory")
    parser.add_argument("--dtype", default=None, help="output dtype (float32, float16, bfloat16); default: the config's or the sources'")
    parser.add_argument("--device", default="cpu", help="where to compute: cpu or cuda (default cpu)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    parser.add_argument("--allow-pickle", action="store_true", help="accept pickle .bin weights (converted to safetensors)")
    parser.add_argument("--shard-size", type=int, default=5 * 10**9, help="max bytes per output shard")
    parser.add_argument("--cache-dir", type=Path, default=None, help="cache for downloaded sources")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so the merge removes its temporary directory on the way out."""


@contextlib.contextmanager
def _terminate_as_interrupt():
    """Turn the first SIGTERM into `Terminated` (later ones are ignored while cleaning up)."""
    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(args: argparse.Namespace) -> int:
    try:
        with _terminate_as_interrupt():
            return _run(args)
    except Terminated:
        print("error: terminated (SIGTERM); nothing half-written was kept (the temporary output directory was "
              "removed); run the same command again", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    loaded = load_config(args.config)
    recipe = loaded.recipe
    for note in loaded.notes:
        print(note, file=sys.stderr)
    if args.dtype:
        parse_dtype(args.dtype)
    check_device(args.device)
    check_shard_size(args.shard_size)
    plan = plan_recipe(recipe)
    refs = ([plan.reference] if plan.reference not in plan.inputs else []) + list(plan.inputs)
    local = {ref: Path(ref.removeprefix("file://")).expanduser() for ref in refs}
    check_not_a_source(args.out_dir, {ref: path for ref, path in local.items() if path.is_dir()})
    check_out_dir(args.out_dir, args.overwrite)
    token = os.environ.get("HF_TOKEN")
    sources = {
        ref: resolve_source(ref, allow_pickle=args.allow_pickle, cache_dir=args.cache_dir, token=token) for ref in refs
    }
    if loaded.layer_range is not None:
        for ref, path in sources.items():
            layers = num_hidden_layers(read_config(path))
            if loaded.layer_range != (0, layers):
                raise ConfigError(
                    f"slice layer_range {list(loaded.layer_range)} does not span all {layers} layers of {ref}; only whole-model slices are supported"
                )
    for stale in remove_stale_temp_dirs(args.out_dir):
        print(f"note: removed {stale.name}, left in {stale.parent} by an interrupted merge", file=sys.stderr)
    notes: list[str] = []
    merge_to_dir(
        recipe,
        sources,
        args.out_dir,
        dtype=args.dtype,
        device=args.device,
        overwrite=args.overwrite,
        shard_size=args.shard_size,
        progress=not args.no_progress,
        notes=notes,
    )
    for note in notes:
        print(note, file=sys.stderr)
    print(f"merged {len(sources)} models with {recipe.merge_method} into {args.out_dir}")
    return 0
