"""`evomerge toyworld [--size micro|demo|cross] [--out DIR]`: build (or reuse from the cache) the
offline toy world and copy it to DIR (default ./toyworld), so a run config can name its models
and task files by stable relative paths (`examples/toyworld-ps.yaml`). No Prefect, no downloads.

DIR holds `models/{base,skill_a,skill_b,lang}/`, `tasks/{union,skill,lang,cross}/{train,validation,test}.jsonl`
and `zoo.json`; an earlier copy of another build is replaced, any other folder is refused."""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from evomerge_core.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `evomerge toyworld`."""
    parser.add_argument("--size", default="micro", choices=["micro", "demo", "cross"],
                        help="toy world size (micro: about 25 s to build on one core; cross: the CROSS world "
                             "of issue 23, 3-7 min; default micro)")
    parser.add_argument("--out", default="toyworld", help="where the copy goes (default: ./toyworld)")


def run(args: argparse.Namespace) -> int:
    """Build or reuse the zoo, then copy it to --out unless the same build is already there."""
    out = Path(args.out).expanduser()
    old_hash = _copied_hash(out)
    from evomerge_core.toyworld import build_zoo

    zoo = build_zoo(args.size)
    if old_hash == zoo.recipe_hash and _copied_size(out) == zoo.size:
        print(f"toyworld[{zoo.size}]: {out} is up to date")
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        shutil.copytree(zoo.root, tmp / "zoo")
        if out.exists():
            shutil.rmtree(out)  # an earlier copy (checked by _copied_hash)
        (tmp / "zoo").rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"toyworld[{zoo.size}]: copied to {out}; try: evomerge evolve examples/toyworld-ps.yaml")
    return 0


def _copied_hash(out: Path) -> str | None:
    """The recipe hash of an earlier copy at `out`; None if nothing is there; UsageError for a
    folder that is not a toy-world copy (never deleted)."""
    if not out.exists():
        return None
    meta = out / "zoo.json"
    if not (out.is_dir() and meta.is_file()):
        raise UsageError(f"--out {out} exists and is not a toy-world copy (no zoo.json); choose another folder")
    return json.loads(meta.read_text()).get("recipe_hash")


def _copied_size(out: Path) -> str | None:
    return json.loads((out / "zoo.json").read_text()).get("size")
