"""One writer for every model directory: built in a temporary sibling, swapped in atomically.

`ModelDirWriter` is the skeleton every writer of a model directory shares (`evomerge merge`,
the VLM merge, the DFS export): stage `.{OUT}.tmp-{host}-{pid}-{random}` next to `OUT`, write
the shards, the config, the aux files, the recipe and the sources record into it, and rename
it over `OUT` at the end (an existing `OUT` is first moved aside into
`.{OUT}.old-{host}-{pid}-{random}` and deleted). The host and pid in the name let a later write
to the same `OUT` tell a directory left by a killed process (its pid is gone on this host:
removed) from one a running process is still using (kept). Directories of other hosts (a shared
filesystem) are never touched. On any error, or an interrupt, nothing is left behind.

`RECIPE_FILE` (`recipe.yaml`) is THE recipe of a model directory, whoever wrote it; readers
also accept the names older versions wrote (`LEGACY_RECIPE_FILES`), see `find_recipe`.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from evomerge_core.errors import MergeError, UsageError
from evomerge_core.io.host import pid_alive
from evomerge_core.io.model_files import PlannedTensor, ShardedWriter, copy_files
from evomerge_core.io.provenance import write_source_record

RECIPE_FILE = "recipe.yaml"
# What `evomerge merge` / the VLM merge (`evomerge_recipe.yaml`) and the DFS export
# (`evomerge_dfs_recipe.yaml`) wrote before there was one name; still read.
LEGACY_RECIPE_FILES = ("evomerge_recipe.yaml", "evomerge_dfs_recipe.yaml")
_TEMP_RE = re.compile(r"^\.(?P<out>.+)\.(?:tmp|old)-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[^/]+$")


def find_recipe(model_dir: Path) -> Path | None:
    """The recipe file of a model directory (`recipe.yaml`, else a legacy name), or None."""
    for name in (RECIPE_FILE, *LEGACY_RECIPE_FILES):
        if (Path(model_dir) / name).is_file():
            return Path(model_dir) / name
    return None


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def temp_prefix(out_dir: Path, kind: str = "tmp") -> str:
    """The `mkdtemp` prefix of a temporary sibling of `out_dir` (`kind`: tmp or old)."""
    return f".{Path(out_dir).name}.{kind}-{_host_tag()}-{os.getpid()}-"


def check_not_a_source(out_dir: Path, sources: Mapping[str, Path]) -> None:
    """Refuse an output directory that is a source model, lies inside one or contains one:
    `--overwrite` would replace (or delete) that source."""
    out = Path(out_dir).expanduser().resolve()
    for ref, path in sources.items():
        src = Path(path).expanduser().resolve()
        if out == src:
            how = "is"
        elif src in out.parents:
            how = "is inside"
        elif out in src.parents:
            how = "contains"
        else:
            continue
        raise UsageError(
            f"output directory {out_dir} {how} the source model {ref!r} ({src}); a merge never writes over "
            "its inputs: choose an output directory outside every source model"
        )


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse an existing non-empty OUT_DIR unless `overwrite` (nothing is touched)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise MergeError(f"output path {out_dir} exists and is not a directory; choose another path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise MergeError(f"output directory {out_dir} exists and is not empty; pass --overwrite or choose another directory")
    ancestor = out_dir.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        what = "is not a directory" if not ancestor.is_dir() else "is not writable"
        raise MergeError(f"cannot create output directory {out_dir}: {ancestor} {what}; choose another path")


def check_target(out_dir: Path, *, overwrite: bool, sources: Mapping[str, Path]) -> None:
    """Every check on OUT_DIR, before anything is created: not a source, `--overwrite` semantics."""
    check_not_a_source(out_dir, sources)
    check_out_dir(out_dir, overwrite)


def remove_stale_temp_dirs(out_dir: Path) -> list[Path]:
    """Remove the temporary directories that killed writers to `out_dir` left on this host
    (their process is gone); returns what was removed. A running writer's directory is kept."""
    out_dir = Path(out_dir)
    parent = out_dir.expanduser().absolute().parent
    if not parent.is_dir():
        return []
    host = _host_tag()
    removed = []
    name = glob.escape(out_dir.name)
    for entry in [*parent.glob(f".{name}.tmp-*"), *parent.glob(f".{name}.old-*")]:
        match = _TEMP_RE.match(entry.name)
        if not match or match["out"] != out_dir.name or match["host"] != host or not entry.is_dir():
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or pid_alive(pid):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        if not entry.exists():
            removed.append(entry)
    return removed


def make_temp_dir(out_dir: Path) -> Path:
    """Create the temporary sibling of `out_dir` (and its parents); MergeError when it cannot."""
    out_dir = Path(out_dir)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=temp_prefix(out_dir), dir=out_dir.parent))
    except OSError as exc:
        raise MergeError(f"cannot create output directory {out_dir} ({exc.strerror or exc}); choose a writable path") from None


def umask_permissions(path: Path) -> None:
    """Give a directory made by `mkdtemp` (0700) the permissions a plain `mkdir` would have."""
    mask = os.umask(0o022)
    os.umask(mask)
    os.chmod(path, 0o777 & ~mask)


@contextlib.contextmanager
def signals_deferred():
    """Hold SIGINT/SIGTERM (delivered on exit) while the output is swapped into place: the two
    renames of `replace_dir` must not be split by an interrupt."""
    try:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    except (AttributeError, OSError, ValueError):  # no pthread_sigmask on this platform
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move a fully written `tmp` directory to `out_dir`; an existing `out_dir` is swapped
    aside first and deleted only once the new one is in place (readers never see a half dir)."""
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=temp_prefix(out_dir, "old"), dir=out_dir.parent))
        os.replace(out_dir, old / "previous")
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def set_config_dtype(config: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """Record `dtype` in a model config under the key it already uses (`torch_dtype` or `dtype`)."""
    config["torch_dtype" if "torch_dtype" in config else "dtype"] = str(dtype).removeprefix("torch.")
    return config


class ModelDirWriter:
    """Build a model directory in a temporary sibling of `out_dir`, then swap it in atomically.

        with ModelDirWriter(out_dir) as out:       # stale temp dirs removed, temp dir made
            writer = out.shards(planned, shard_size)
            ...                                    # writer.write(name, tensor) in plan order
            out.write_config(config)
            out.copy_files(src_dir, AUX_FILES)
            out.write_recipe(text)
            out.write_sources(sources)
            out.commit()                           # shards closed, renamed over out_dir

    Leaving the block without `commit` (an error, an interrupt) removes the temporary directory.
    Checks on `out_dir` (`check_target`) belong before the writer is opened.
    """

    def __init__(self, out_dir: Path | str):
        self.out_dir = Path(out_dir)
        self.tmp: Path | None = None
        self._writer: Any = None

    def __enter__(self) -> ModelDirWriter:
        remove_stale_temp_dirs(self.out_dir)
        tmp = make_temp_dir(self.out_dir)
        try:
            umask_permissions(tmp)  # mkdtemp makes 0700
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.tmp = tmp
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.tmp is None:
            return
        if self._writer is not None:
            self._writer.abort()
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp = None

    @property
    def path(self) -> Path:
        """The temporary directory being built."""
        if self.tmp is None:
            raise RuntimeError("ModelDirWriter is not open")
        return self.tmp

    def shards(self, planned: Sequence[PlannedTensor], shard_size: int, writer_cls: type = ShardedWriter, **kwargs: Any):
        """The shard writer of this directory (`ShardedWriter`, or e.g. the O_DIRECT one)."""
        self._writer = writer_cls(self.path, planned, shard_size, **kwargs)
        return self._writer

    def write_config(self, config: Mapping[str, Any]) -> None:
        """Write `config.json`."""
        (self.path / "config.json").write_text(json.dumps(config, indent=2))

    def copy_files(self, src: Path, names: Iterable[str]) -> list[str]:
        """Copy the named files of `src` that exist (tokenizer, processor, generation config)."""
        return copy_files(Path(src), self.path, names)

    def write_recipe(self, text: str) -> None:
        """Write THE recipe (`recipe.yaml`)."""
        (self.path / RECIPE_FILE).write_text(text)

    def write_sources(self, sources: Mapping[str, Path]) -> None:
        """Write `evomerge_sources.json` (the Hub commits of the sources, for the card)."""
        write_source_record(self.path, sources)

    def commit(self) -> Path:
        """Finish the shards and swap the directory into place (interrupts held meanwhile)."""
        if self._writer is not None:
            self._writer.close()
        with signals_deferred():
            replace_dir(self.path, self.out_dir)
        self.tmp = None
        return self.out_dir
