"""The run store: everything needed to resume an evolution run, on ``file://`` or ``s3://``.

Layout under ``{storage}/{run_key}/`` (see docs/storage.md):

- ``config.yaml``               frozen run config; first line ``# ... sha256=<hex of the rest>``
- ``generations/{g:05d}.json``  one generation's record (candidates, optimizer state)
- ``latest.json``               pointer to the last completed generation, written last
- ``candidates/{key}.json``     finished evaluations of an unfinished generation
- ``result.json`` and any other :meth:`RunStore.write_json` document
- ``best/``, ``report/``        directories published with :meth:`RunStore.put_dir`
- ``lease.json``                who is running on this run key, until when

Every JSON object is an envelope ``{"format", "sha256", "payload"}`` where ``sha256`` is the
hash of the payload's canonical JSON; readers verify it. Nothing is ever unpickled or executed:
JSON and YAML are read with ``json.loads`` and ``yaml.safe_load`` only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

from evomerge_core.errors import ConfigError, StorageError
from evomerge_core.io.model_dir import ModelDirWriter
from evomerge_core.runs.storage import Backend, open_backend

__all__ = [
    "RunStore",
    "RunStoreWarning",
    "CorruptObjectError",
    "candidate_key",
    "diff_configs",
    "describe_config_diff",
    "ensure_same_config",
    "canonical_json",
]

logger = logging.getLogger(__name__)

FORMAT = "evomerge-runstore/1"
CONFIG = "config.yaml"
LATEST = "latest.json"
LEASE = "lease.json"
GENERATIONS = "generations"
CANDIDATES = "candidates"
MANIFEST = "_manifest.json"
_RESERVED = (CONFIG, LATEST, LEASE, GENERATIONS, CANDIDATES)
_CONFIG_HEADER = re.compile(r"^# evomerge run config \(frozen\); sha256=([0-9a-f]{64})\n")
_RUN_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$")
_CANDIDATE_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,127}$")
_GENERATION_NAME = re.compile(r"^(\d{5,})\.json$")


class RunStoreWarning(UserWarning):
    """A damaged checkpoint was skipped or a lease was taken over."""


class CorruptObjectError(StorageError):
    """An object exists but is not a valid, checksummed run-store document."""


def canonical_json(obj: Any) -> bytes:
    """The canonical encoding that checksums are computed over (sorted keys, no spaces).

    Floats are written with ``repr`` and so round-trip exactly. Non-finite floats are written as
    Python's ``NaN``/``Infinity`` tokens, so a failed candidate's ``-inf`` fitness survives.
    """
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _warn(message: str) -> None:
    logger.warning(message)
    warnings.warn(message, RunStoreWarning, stacklevel=3)


def candidate_key(
    genome: Iterable[float], sources_revisions: dict[str, str], fitness_config: dict[str, Any]
) -> str:
    """Stable sha256 hex key of one evaluation: genome (floats as ``repr``), the sources'
    revisions and the fitness config. Equal inputs give the same key on every machine."""
    try:
        doc = {
            "genome": [repr(float(x)) for x in genome],
            "sources": {str(k): str(v) for k, v in sources_revisions.items()},
            "fitness": fitness_config,
        }
        return _sha256(canonical_json(doc))
    except (TypeError, ValueError) as exc:
        raise StorageError(
            f"cannot compute a candidate key: {exc}; pass a list of floats, a dict of source "
            "revisions and a JSON-serialisable fitness config."
        ) from None


class RunStore:
    """Checkpoints of one run (``run_key``) under a storage URL.

    ``storage_url`` is ``file:///abs/path``, a plain local path or ``s3://bucket/prefix``.
    ``storage_options`` go to s3fs (e.g. ``endpoint_url``, ``key``, ``secret``); they are never
    written anywhere and are redacted from error messages.
    """

    def __init__(
        self, storage_url: str, run_key: str, *, storage_options: dict[str, Any] | None = None
    ) -> None:
        if not isinstance(run_key, str) or not _RUN_KEY_RE.match(run_key):
            raise StorageError(
                f"run key {run_key!r} is invalid; use 1-128 characters from letters, digits, "
                "'.', '_' and '-', starting with a letter or digit."
            )
        self.run_key = run_key
        base = open_backend(storage_url, storage_options)
        self._backend: Backend = _Scoped(base, run_key)
        self._secrets = base._secrets
        self._clock: Callable[[], float] = time.time

    # Paths ----------------------------------------------------------------------------------
    def url(self, relpath: str = "") -> str:
        """Full URL of ``relpath`` inside the run (the run's root URL for ``""``)."""
        if relpath:
            _check_relpath(relpath)
        return self._backend.location.url(relpath)

    def exists(self) -> bool:
        """``True`` once the run's ``config.yaml`` has been written."""
        return self._backend.exists(CONFIG)

    def check_access(self) -> None:
        """Raise :class:`StorageError` naming the fix unless the storage can be used (bad
        credentials, a missing bucket, an unreachable endpoint, an unwritable folder)."""
        self._backend.check_access()

    def clear(self) -> int:
        """Delete every object of the run except ``lease.json`` (to start over with
        ``--no-resume``); ``latest.json`` goes first so no reader sees a half-cleared run as
        resumable. Returns the number of objects deleted."""
        keys = [k for k in self._backend.list_recursive("") if k != LEASE]
        keys.sort(key=lambda k: (k != LATEST, k != CONFIG, k))
        for key in keys:
            self._backend.delete(key)
        return len(keys)

    # Envelope IO ----------------------------------------------------------------------------
    def _encode(self, payload: Any, key: str) -> bytes:
        try:
            body = canonical_json(payload)
        except (TypeError, ValueError) as exc:
            raise StorageError(
                f"cannot write {self.url(key)}: the record is not JSON-serialisable ({exc}); "
                "convert arrays and numpy scalars to lists and floats first."
            ) from None
        data = canonical_json({"format": FORMAT, "sha256": _sha256(body), "payload": payload})
        self._guard_secrets(data, key)
        return data

    def _decode(self, data: bytes, key: str) -> Any:
        where = self.url(key)
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptObjectError(f"{where} is not valid JSON ({exc}); it is corrupt.") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or "payload" not in doc:
            raise CorruptObjectError(f"{where} is not a run-store document (format {FORMAT}).")
        if _sha256(canonical_json(doc["payload"])) != doc.get("sha256"):
            raise CorruptObjectError(f"{where} fails its sha256 check; it is corrupt.")
        return doc["payload"]

    def _write_doc(self, key: str, payload: Any) -> None:
        self._backend.write_bytes(key, self._encode(payload, key))

    def _read_doc(self, key: str) -> Any | None:
        data = self._backend.read_bytes(key)
        return None if data is None else self._decode(data, key)

    def _guard_secrets(self, data: bytes, key: str) -> None:
        for secret in self._secrets:
            if secret.encode() in data:
                raise StorageError(
                    f"refusing to write {self.url(key)}: it contains a credential (a storage "
                    "option or AWS/HF token value); remove credentials from the config and "
                    "pass them through the environment instead."
                )

    # Config ---------------------------------------------------------------------------------
    def write_config(self, config: dict[str, Any]) -> None:
        """Write the frozen run config as ``config.yaml`` with a sha256 header line."""
        if not isinstance(config, dict):
            raise StorageError(f"the run config must be a mapping, not {type(config).__name__}.")
        try:
            body = yaml.safe_dump(config, sort_keys=True, allow_unicode=True).encode()
        except yaml.YAMLError as exc:
            raise StorageError(
                f"cannot write {self.url(CONFIG)}: the config holds a value YAML cannot "
                f"represent ({exc}); use plain strings, numbers, lists and mappings."
            ) from None
        data = f"# evomerge run config (frozen); sha256={_sha256(body)}\n".encode() + body
        self._guard_secrets(data, CONFIG)
        self._backend.write_bytes(CONFIG, data)

    def read_config(self) -> dict[str, Any] | None:
        """The stored run config, or ``None`` if there is none; raises if it fails its check."""
        data = self._backend.read_bytes(CONFIG)
        if data is None:
            return None
        where = self.url(CONFIG)
        text = data.decode("utf-8", errors="replace")
        match = _CONFIG_HEADER.match(text)
        if not match:
            raise CorruptObjectError(
                f"{where} has no evomerge checksum header; it was edited or not written by "
                "evomerge: restore it, or start over with a new run key."
            )
        body = data[len(match.group(0).encode()) :]
        if _sha256(body) != match.group(1):
            raise CorruptObjectError(
                f"{where} fails its sha256 check (edited or corrupt): restore it, or start over "
                "with a new run key."
            )
        config = yaml.safe_load(body)
        if not isinstance(config, dict):
            raise CorruptObjectError(f"{where} does not hold a mapping.")
        return config

    # Generations ----------------------------------------------------------------------------
    @staticmethod
    def _generation_key(generation: int) -> str:
        if isinstance(generation, bool) or not isinstance(generation, int) or generation < 0:
            raise StorageError(f"generation must be an int >= 0, not {generation!r}.")
        return f"{GENERATIONS}/{generation:05d}.json"

    def write_generation(self, generation: int, record: dict[str, Any]) -> None:
        """Atomically write generation ``generation``'s record (checksummed)."""
        self._write_doc(self._generation_key(generation), _require_dict(record, "record"))

    def read_generation(self, generation: int) -> dict[str, Any]:
        """Generation ``generation``'s record; :class:`StorageError` if missing or corrupt."""
        key = self._generation_key(generation)
        record = self._read_doc(key)
        if record is None:
            raise StorageError(f"{self.url(key)} does not exist.")
        if not isinstance(record, dict):
            raise CorruptObjectError(f"{self.url(key)} does not hold a record.")
        return record

    def generations(self) -> list[int]:
        """Numbers of the generation files present (not verified), ascending."""
        numbers = []
        for name in self._backend.list_names(GENERATIONS):
            m = _GENERATION_NAME.match(name)
            if m:
                numbers.append(int(m.group(1)))
        return sorted(numbers)

    def write_latest(self, record: dict[str, Any]) -> None:
        """Publish ``latest.json`` (needs an int ``generation``); call after the generation."""
        record = _require_dict(record, "record")
        self._generation_key(record.get("generation"))  # type: ignore[arg-type]
        self._write_doc(LATEST, record)

    def read_latest(self) -> dict[str, Any] | None:
        """The last completed generation's pointer record, verified.

        If ``latest.json`` is missing or corrupt, or the generation it names is missing or
        corrupt, the newest valid generation file (older than the one named, if any) is used
        instead, with a :class:`RunStoreWarning`, and ``{"generation": g, "recovered": True}`` is
        returned: the caller recomputes the best so far from the generation records.
        ``None`` when there is nothing to resume from.
        """
        latest: dict[str, Any] | None = None
        try:
            doc = self._read_doc(LATEST)
            if doc is not None:
                if not isinstance(doc, dict) or not _is_generation(doc.get("generation")):
                    raise CorruptObjectError(f"{self.url(LATEST)} names no generation.")
                latest = doc
        except CorruptObjectError as exc:
            _warn(f"{exc} Falling back to the newest valid generation file.")
        numbers = self.generations()
        if latest is not None:
            try:
                self.read_generation(latest["generation"])
                return latest
            except StorageError as exc:
                _warn(f"latest.json names generation {latest['generation']}, but {exc}")
            numbers = [n for n in numbers if n < latest["generation"]]
        elif not numbers:
            return None
        elif self._backend.read_bytes(LATEST) is None:
            _warn(f"{self.url(LATEST)} is missing although generation files exist.")
        for n in reversed(numbers):
            try:
                self.read_generation(n)
            except StorageError as exc:
                _warn(f"skipping generation {n}: {exc}")
                continue
            _warn(f"resuming from generation {n} ({self.url(self._generation_key(n))}).")
            return {"generation": n, "recovered": True}
        _warn(f"no valid generation file under {self.url(GENERATIONS)}; starting from scratch.")
        return None

    # Candidate cache ------------------------------------------------------------------------
    def _candidate_path(self, key: str) -> str:
        if not isinstance(key, str) or not _CANDIDATE_KEY_RE.match(key):
            raise StorageError(
                f"candidate key {key!r} is invalid; use candidate_key() to compute one."
            )
        return f"{CANDIDATES}/{key}.json"

    def put_candidate(self, key: str, record: dict[str, Any]) -> None:
        """Store one finished evaluation under ``candidates/{key}.json``."""
        self._write_doc(self._candidate_path(key), _require_dict(record, "record"))

    def get_candidate(self, key: str) -> dict[str, Any] | None:
        """A stored evaluation, or ``None`` (also, with a warning, if it is corrupt)."""
        path = self._candidate_path(key)
        try:
            record = self._read_doc(path)
        except CorruptObjectError as exc:
            _warn(f"{exc} The candidate will be evaluated again.")
            return None
        return record if isinstance(record, dict) else None

    # Other documents and files --------------------------------------------------------------
    def write_json(self, relpath: str, obj: dict[str, Any]) -> None:
        """Atomically write a checksummed JSON document (e.g. ``result.json``)."""
        self._write_doc(_check_user_relpath(relpath), _require_dict(obj, "obj"))

    def read_json(self, relpath: str) -> dict[str, Any] | None:
        """A document written by :meth:`write_json`; ``None`` if missing, raises if corrupt."""
        doc = self._read_doc(_check_user_relpath(relpath))
        if doc is not None and not isinstance(doc, dict):
            raise CorruptObjectError(f"{self.url(relpath)} does not hold a mapping.")
        return doc

    def put_file(self, local_path: Path, relpath: str) -> None:
        """Publish one local file at ``relpath`` (atomic for readers)."""
        local_path = Path(local_path)
        if not local_path.is_file():
            raise StorageError(f"cannot upload {local_path}: it is not a file.")
        self._backend.upload_file(local_path, _check_user_relpath(relpath))

    def put_dir(self, local_dir: Path, relpath: str) -> None:
        """Publish a local directory at ``relpath``: files first, then a manifest of their
        sha256 sums; :meth:`get_dir` only accepts a directory whose manifest matches."""
        local_dir = Path(local_dir)
        relpath = _check_user_relpath(relpath)
        if not local_dir.is_dir():
            raise StorageError(f"cannot upload {local_dir}: it is not a directory.")
        files = sorted(p for p in local_dir.rglob("*") if p.is_file())
        names = [p.relative_to(local_dir).as_posix() for p in files]
        if MANIFEST in names:
            raise StorageError(f"cannot upload {local_dir}: it holds a file named {MANIFEST}.")
        manifest_key = f"{relpath}/{MANIFEST}"
        self._backend.delete(manifest_key)  # readers see "incomplete", never a mix
        entries = {}
        for path, name in zip(files, names):
            self._backend.upload_file(path, f"{relpath}/{name}")
            entries[name] = {"sha256": _file_sha256(path), "size": path.stat().st_size}
        self._write_doc(manifest_key, {"files": entries})
        for stale in self._backend.list_recursive(relpath):
            if stale != MANIFEST and stale not in entries:
                self._backend.delete(f"{relpath}/{stale}")

    def get_dir(self, relpath: str, local_dir: Path) -> Path:
        """Download a directory published by :meth:`put_dir` into ``local_dir`` (which must not
        exist or be empty), verifying every file's sha256; returns ``local_dir``."""
        relpath = _check_user_relpath(relpath)
        local_dir = Path(local_dir)
        if local_dir.exists() and (not local_dir.is_dir() or any(local_dir.iterdir())):
            raise StorageError(
                f"cannot download {self.url(relpath)} into {local_dir}: it exists and is not an "
                "empty directory; choose a new path."
            )
        manifest = self._read_doc(f"{relpath}/{MANIFEST}")
        if manifest is None:
            raise StorageError(
                f"{self.url(relpath)} is not a complete directory (no {MANIFEST}: it was never "
                "published or its upload did not finish)."
            )
        entries = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(entries, dict):
            raise CorruptObjectError(f"{self.url(relpath)}/{MANIFEST} lists no files.")
        with ModelDirWriter(local_dir) as out:  # temp sibling, swapped in once every file checks out
            for name, meta in entries.items():
                _check_relpath(name)  # storage is untrusted: no '..' or absolute names
                target = out.path / name
                target.parent.mkdir(parents=True, exist_ok=True)
                self._backend.download_file(f"{relpath}/{name}", target)
                if not isinstance(meta, dict) or _file_sha256(target) != meta.get("sha256"):
                    raise CorruptObjectError(
                        f"{self.url(relpath)}/{name} fails its sha256 check; it is corrupt."
                    )
            out.commit()
        return local_dir

    # Lease ----------------------------------------------------------------------------------
    def _lease_doc(self, owner: str, ttl_s: float, acquired_at: float | None = None) -> bytes:
        now = self._clock()
        return self._encode(
            {
                "owner": owner,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "acquired_at": now if acquired_at is None else acquired_at,
                "renewed_at": now,
                "ttl_s": float(ttl_s),
                "expires_at": now + float(ttl_s),
            },
            LEASE,
        )

    def _read_lease(self) -> tuple[dict[str, Any] | None, str] | None:
        """``(lease or None if corrupt, version token)``, or ``None`` if there is no lease."""
        current = self._backend.read_versioned(LEASE)
        if current is None:
            return None
        data, token = current
        try:
            lease = self._decode(data, LEASE)
        except CorruptObjectError as exc:
            _warn(f"{exc} Treating the lease as expired.")
            return None, token
        if not isinstance(lease, dict) or not isinstance(lease.get("expires_at"), (int, float)):
            _warn(f"{self.url(LEASE)} is not a valid lease; treating it as expired.")
            return None, token
        return lease, token

    def acquire_lease(
        self,
        owner: str,
        ttl_s: float = 600,
        takeover_if: Callable[[dict[str, Any]], bool] | None = None,
    ) -> None:
        """Take the run's lease for ``owner`` for ``ttl_s`` seconds.

        Raises :class:`StorageError` if another owner holds an unexpired lease, unless
        ``takeover_if(lease)`` says its holder is gone (e.g. a dead process on this host). An
        expired (or corrupt) lease is taken over with a warning; the owner's own lease is renewed.
        """
        _check_owner(owner)
        if not ttl_s > 0:
            raise StorageError(f"lease ttl_s must be > 0, not {ttl_s!r}.")
        for _ in range(5):  # a lost race re-reads the lease; it cannot loop forever
            if self._backend.create_exclusive(LEASE, self._lease_doc(owner, ttl_s)):
                return
            current = self._read_lease()
            if current is None:
                continue  # released in between
            lease, token = current
            now = self._clock()
            if lease is not None and lease.get("owner") == owner:
                doc = self._lease_doc(owner, ttl_s, lease.get("acquired_at"))
                if self._backend.replace_if_version(LEASE, doc, token):
                    return
                continue
            gone = False
            if lease is not None and lease["expires_at"] > now:
                gone = takeover_if is not None and takeover_if(lease)
                if not gone:
                    raise StorageError(_held_message(self.url(LEASE), lease, now))
            if self._backend.replace_if_version(LEASE, self._lease_doc(owner, ttl_s), token):
                if lease is not None:
                    _warn(
                        f"took over the {'unexpired' if gone else 'expired'} lease of owner "
                        f"{lease.get('owner')!r} (host {lease.get('host')!r}, pid "
                        f"{lease.get('pid')}) on {self.url()}"
                        + (": its process is gone." if gone else ".")
                    )
                return
        raise StorageError(
            f"could not acquire {self.url(LEASE)}: other processes keep changing it; make sure "
            "only one run uses this run key."
        )

    def renew_lease(self, owner: str, ttl_s: float | None = None) -> None:
        """Extend ``owner``'s lease by its ttl (or ``ttl_s``); raises if it was lost."""
        _check_owner(owner)
        current = self._read_lease()
        lease = current[0] if current else None
        if current is None or lease is None or lease.get("owner") != owner:
            holder = f"owner {lease.get('owner')!r}" if lease else "nobody"
            raise StorageError(
                f"cannot renew {self.url(LEASE)} for {owner!r}: it is held by {holder}; this run "
                "lost its lease (it expired and was taken over) and must stop."
            )
        ttl = float(ttl_s if ttl_s is not None else lease.get("ttl_s", 600))
        doc = self._lease_doc(owner, ttl, lease.get("acquired_at"))
        if not self._backend.replace_if_version(LEASE, doc, current[1]):
            raise StorageError(
                f"cannot renew {self.url(LEASE)} for {owner!r}: it changed concurrently; this "
                "run lost its lease and must stop."
            )

    def release_lease(self, owner: str) -> None:
        """Remove ``owner``'s lease; no-op if there is none; raises if another owner holds it."""
        _check_owner(owner)
        current = self._read_lease()
        if current is None:
            return
        lease, token = current
        if lease is not None and lease.get("owner") != owner:
            raise StorageError(
                f"cannot release {self.url(LEASE)} for {owner!r}: it is held by "
                f"{lease.get('owner')!r}."
            )
        if lease is None:
            return  # corrupt: leave it for the next acquire, which takes it over
        if not self._backend.delete_if_version(LEASE, token):
            raise StorageError(
                f"cannot release {self.url(LEASE)} for {owner!r}: it changed concurrently."
            )

    def read_lease(self) -> dict[str, Any] | None:
        """The current lease record (for display), or ``None``."""
        current = self._read_lease()
        return current[0] if current else None


class _Scoped(Backend):
    """A backend view rooted at ``{root}/{run_key}``."""

    def __init__(self, inner: Backend, run_key: str) -> None:
        self._inner = inner
        self._prefix = run_key
        self._secrets = inner._secrets
        base = inner.location
        self.location = type(base)(base.protocol, f"{base.root}/{run_key}")

    def _k(self, key: str) -> str:
        return f"{self._prefix}/{key}" if key else self._prefix

    def write_bytes(self, key: str, data: bytes) -> None:
        self._inner.write_bytes(self._k(key), data)

    def read_bytes(self, key: str) -> bytes | None:
        return self._inner.read_bytes(self._k(key))

    def exists(self, key: str) -> bool:
        return self._inner.exists(self._k(key))

    def list_names(self, prefix: str) -> list[str]:
        return self._inner.list_names(self._k(prefix))

    def list_recursive(self, prefix: str) -> list[str]:
        return self._inner.list_recursive(self._k(prefix))

    def delete(self, key: str) -> None:
        self._inner.delete(self._k(key))

    def upload_file(self, local: Path, key: str) -> None:
        self._inner.upload_file(local, self._k(key))

    def download_file(self, key: str, local: Path) -> None:
        self._inner.download_file(self._k(key), local)

    def create_exclusive(self, key: str, data: bytes) -> bool:
        return self._inner.create_exclusive(self._k(key), data)

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        return self._inner.read_versioned(self._k(key))

    def replace_if_version(self, key: str, data: bytes, token: str) -> bool:
        return self._inner.replace_if_version(self._k(key), data, token)

    def delete_if_version(self, key: str, token: str) -> bool:
        return self._inner.delete_if_version(self._k(key), token)

    def check_access(self) -> None:
        self._inner.check_access()


# Helpers ------------------------------------------------------------------------------------
def _require_dict(obj: Any, name: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise StorageError(f"{name} must be a dict, not {type(obj).__name__}.")
    return obj


def _is_generation(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_relpath(relpath: str) -> str:
    parts = relpath.split("/") if isinstance(relpath, str) else [""]
    if (
        not isinstance(relpath, str)
        or not relpath
        or "\\" in relpath
        or any(p in ("", ".", "..") or p.startswith(".") for p in parts)
    ):
        raise StorageError(
            f"path {relpath!r} is invalid inside a run; use a relative path such as "
            "'result.json' or 'report/report.md' (no '..', no leading '/' or '.')."
        )
    return relpath


def _check_user_relpath(relpath: str) -> str:
    _check_relpath(relpath)
    if relpath.split("/")[0] in _RESERVED:
        raise StorageError(
            f"path {relpath!r} is reserved by the run store; use the dedicated method "
            "(write_config, write_generation, write_latest, put_candidate, acquire_lease)."
        )
    return relpath


def _check_owner(owner: str) -> None:
    if not isinstance(owner, str) or not owner.strip():
        raise StorageError(f"lease owner must be a non-empty string, not {owner!r}.")


def _held_message(where: str, lease: dict[str, Any], now: float) -> str:
    left = lease["expires_at"] - now
    return (
        f"run is already in progress: {where} is held by owner {lease.get('owner')!r} "
        f"(host {lease.get('host')!r}, pid {lease.get('pid')}) for another {left:.0f} s; wait for "
        "that run to finish (or its lease to expire), or use another run key."
    )


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# Config comparison --------------------------------------------------------------------------
_MISSING = object()


def _flatten(obj: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(obj, dict) and obj:
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(obj, list) and obj:
        for i, v in enumerate(obj):
            _flatten(v, f"{prefix}[{i}]", out)
    else:
        out[prefix] = obj


def _is_allowed(key: str, allowed: set[str]) -> bool:
    # "budget" allows "budget.generations"; "sources" allows "sources[0].model"
    return any(key == a or key.startswith(a + ".") or key.startswith(a + "[") for a in allowed)


def diff_configs(old: dict[str, Any], new: dict[str, Any], allowed: set[str]) -> list[str]:
    """Dotted keys (lists indexed as ``key[i]``) whose values differ between ``old`` and
    ``new``, sorted, leaving out keys equal to or under an entry of ``allowed``."""
    flat_old: dict[str, Any] = {}
    flat_new: dict[str, Any] = {}
    _flatten(old, "", flat_old)
    _flatten(new, "", flat_new)
    changed = []
    for key in sorted(set(flat_old) | set(flat_new)):
        a, b = flat_old.get(key, _MISSING), flat_new.get(key, _MISSING)
        same = a is not _MISSING and b is not _MISSING and type(a) is type(b) and a == b
        if not same and not _is_allowed(key, allowed):
            changed.append(key)
    return changed


def describe_config_diff(old: dict[str, Any], new: dict[str, Any], keys: list[str]) -> str:
    """``key: old -> new`` lines for ``keys`` (as returned by :func:`diff_configs`)."""
    flat_old: dict[str, Any] = {}
    flat_new: dict[str, Any] = {}
    _flatten(old, "", flat_old)
    _flatten(new, "", flat_new)

    def show(v: Any) -> str:
        return "(absent)" if v is _MISSING else json.dumps(v, sort_keys=True, default=str)

    return "\n".join(
        f"{k}: {show(flat_old.get(k, _MISSING))} -> {show(flat_new.get(k, _MISSING))}"
        for k in keys
    )


def ensure_same_config(
    old: dict[str, Any], new: dict[str, Any], allowed: set[str], where: str = "the stored run"
) -> None:
    """Raise :class:`ConfigError` listing what changed if ``new`` differs from ``old`` outside
    ``allowed``."""
    keys = diff_configs(old, new, allowed)
    if keys:
        raise ConfigError(
            f"cannot resume {where}: the config differs in {', '.join(keys)}; restore those "
            "values, or start over with --no-resume or a new --run-key.\n"
            + describe_config_diff(old, new, keys)
        )
