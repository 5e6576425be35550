"""The output directory of a merge: never a source, built in a temporary sibling, nothing left.

A merge writes into `.{OUT}.tmp-{host}-{pid}-{random}` next to `OUT` and renames it at the end
(an existing `OUT` is first moved aside into `.{OUT}.old-{host}-{pid}-{random}` and deleted).
The host and pid in the name let a later merge to the same `OUT` tell a directory left by a
killed merge (its pid is gone on this host: removed) from one a running merge is still using
(kept). Directories of other hosts (a shared filesystem) are never touched.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import re
import shutil
import signal
import socket
import tempfile
from pathlib import Path
from typing import Mapping

from evomerge_core.errors import MergeError, UsageError

_TEMP_RE = re.compile(r"^\.(?P<out>.+)\.(?:tmp|old)-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[^/]+$")


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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def remove_stale_temp_dirs(out_dir: Path) -> list[Path]:
    """Remove the temporary directories that killed merges to `out_dir` left on this host
    (their process is gone); returns what was removed. A running merge's directory is kept."""
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
        if pid == os.getpid() or _pid_alive(pid):
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
    renames of `io.replace_dir` must not be split by an interrupt."""
    try:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    except (AttributeError, OSError, ValueError):  # no pthread_sigmask on this platform
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
