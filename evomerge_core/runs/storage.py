"""Storage backends for the run store: URL parsing and atomic object IO.

Two backends share one small interface (:class:`Backend`):

- :class:`LocalBackend` for ``file:///abs/path``, ``file://./relative/path`` (resolved against the
  current directory) and plain local paths. Writes go to a temporary
  file in the same directory, are fsynced and then published with ``os.replace`` (atomic on
  POSIX). fsspec's local ``pipe`` is not atomic, so this backend uses ``os`` directly.
- :class:`S3Backend` for ``s3://bucket/prefix`` through fsspec/s3fs. A single-object PUT is
  atomic, and conditional writes (``If-None-Match: *`` / ``If-Match: <etag>``) give the
  compare-and-swap the lease needs.

Paths given to a backend are keys relative to its root, ``/``-separated. Every failure is raised
as :class:`StorageError` with secrets (storage option values, AWS/HF tokens from the
environment) replaced by ``***``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from evomerge_core.errors import StorageError, StorageURLError

ACCEPTED_FORMS = "file:///absolute/path, file://./relative/path, a plain local path, or s3://bucket[/prefix]"
SECRET_ENV_VARS = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ACCESS_KEY_ID",
    "AWS_SESSION_TOKEN",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
)
_SECRET_OPTION_NAME = re.compile(r"key|secret|token|password|credential", re.IGNORECASE)
_MIN_SECRET_LEN = 6  # shorter values would match ordinary text and are not real secrets
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-_]{1,61}[a-z0-9]$")
# temporary files of an atomic write and lock files (LocalBackend); never part of the content
_INTERNAL_LOCAL_NAME = re.compile(r"^\..*\.(tmp-[0-9a-f]{32}|lock)$")


@dataclass(frozen=True)
class StorageLocation:
    """A parsed storage URL: ``protocol`` is ``file`` or ``s3``; ``root`` has no trailing ``/``.

    For ``file`` the root is an absolute local path; for ``s3`` it is ``bucket[/prefix]``.
    """

    protocol: str
    root: str

    def url(self, key: str = "") -> str:
        """Full URL of ``key`` under this root."""
        base = f"file://{self.root}" if self.protocol == "file" else f"s3://{self.root}"
        return f"{base}/{key}" if key else base


def parse_storage_url(url: str) -> StorageLocation:
    """Parse a storage URL; raise :class:`StorageError` naming the URL and the accepted forms."""
    if not isinstance(url, str) or not url.strip():
        raise StorageURLError(f"storage URL {url!r} is empty; use {ACCEPTED_FORMS}.")
    url = url.strip()
    if "://" not in url:
        if re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*:", url) and not re.match(r"^[A-Za-z]:[\\/]", url):
            raise StorageURLError(f"storage URL {url!r} is malformed; use {ACCEPTED_FORMS}.")
        return StorageLocation("file", _clean_local(os.path.abspath(os.path.expanduser(url))))
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if parts.query or parts.fragment:
        raise StorageURLError(
            f"storage URL {url!r} has a query or fragment, which is not supported; "
            f"use {ACCEPTED_FORMS}."
        )
    if scheme == "file":
        rest = url[len("file://"):]
        if rest in (".", "..", "~") or rest.startswith(("./", "../", "~/")):
            # A relative file URL (file://./runs, the config default): resolved against the
            # current directory now, so the run store never moves with a later chdir.
            return StorageLocation("file", _clean_local(os.path.abspath(os.path.expanduser(rest))))
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise StorageURLError(
                f"storage URL {url!r} is not an absolute file URL (write file:///abs/path with "
                f"three slashes); use {ACCEPTED_FORMS}."
            )
        return StorageLocation("file", _clean_local(parts.path))
    if scheme == "s3":
        bucket = parts.netloc
        if not bucket or not _BUCKET_RE.match(bucket) or "@" in bucket or ":" in bucket:
            raise StorageURLError(
                f"storage URL {url!r} has no valid bucket name (3-63 lowercase letters, digits, "
                f"'.', '-'); use {ACCEPTED_FORMS}."
            )
        prefix = "/".join(p for p in parts.path.split("/") if p)
        if any(p in (".", "..") for p in prefix.split("/")):
            raise StorageURLError(f"storage URL {url!r} contains '.' or '..'; use {ACCEPTED_FORMS}.")
        return StorageLocation("s3", f"{bucket}/{prefix}" if prefix else bucket)
    raise StorageURLError(
        f"storage URL {url!r} uses the unsupported scheme {scheme!r}; use {ACCEPTED_FORMS}."
    )


def _clean_local(path: str) -> str:
    cleaned = os.path.normpath(path)
    return cleaned if cleaned != "/" else ""


def secret_values(storage_options: dict[str, Any] | None) -> list[str]:
    """Secret strings to keep out of files and messages: credential-like storage options
    (at any nesting depth) and credential environment variables."""
    found: list[str] = []

    def walk(obj: Any, name: str = "") -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, str(k))
        elif isinstance(obj, str) and _SECRET_OPTION_NAME.search(name):
            found.append(obj)

    walk(storage_options or {})
    found.extend(os.environ.get(v, "") for v in SECRET_ENV_VARS)
    return sorted({s for s in found if len(s) >= _MIN_SECRET_LEN}, key=len, reverse=True)


def redact(text: str, secrets: list[str]) -> str:
    """Replace every secret value in ``text`` by ``***``."""
    for s in secrets:
        text = text.replace(s, "***")
    return text


class Backend:
    """Object IO relative to a root. Keys are ``/``-separated and already validated."""

    location: StorageLocation

    def __init__(self, location: StorageLocation, secrets: list[str]) -> None:
        self.location = location
        self._secrets = secrets

    def error(self, action: str, key: str, exc: BaseException | str) -> StorageError:
        """A :class:`StorageError` for a failed ``action`` on ``key``, secrets redacted."""
        detail = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        msg = f"cannot {action} {self.location.url(key)}: {detail}"
        return StorageError(redact(msg, self._secrets))

    # Interface ------------------------------------------------------------------------------
    def write_bytes(self, key: str, data: bytes) -> None:
        """Publish ``data`` at ``key`` atomically (readers see the old or the new object)."""
        raise NotImplementedError

    def read_bytes(self, key: str) -> bytes | None:
        """The object's bytes, or ``None`` if it does not exist."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def list_names(self, prefix: str) -> list[str]:
        """Names of the objects directly under the folder ``prefix`` (no recursion)."""
        raise NotImplementedError

    def list_recursive(self, prefix: str) -> list[str]:
        """Keys (relative to ``prefix``) of every object under the folder ``prefix``."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        """Delete one object; a missing object is not an error."""
        raise NotImplementedError

    def upload_file(self, local: Path, key: str) -> None:
        """Copy a local file to ``key`` (atomically for readers)."""
        raise NotImplementedError

    def download_file(self, key: str, local: Path) -> None:
        raise NotImplementedError

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Write ``data`` only if ``key`` does not exist; ``False`` if it does."""
        raise NotImplementedError

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        """The object's bytes and a version token for :meth:`replace_if_version`."""
        raise NotImplementedError

    def replace_if_version(self, key: str, data: bytes, token: str) -> bool:
        """Overwrite ``key`` only if it still has version ``token``; ``False`` otherwise."""
        raise NotImplementedError

    def delete_if_version(self, key: str, token: str) -> bool:
        """Delete ``key`` only if it still has version ``token`` (best effort on S3)."""
        raise NotImplementedError

    def check_access(self) -> None:
        """Raise :class:`StorageError` (with the fix) unless the root can be used: a writable
        local folder (or one that can be created), or a reachable S3 bucket with these
        credentials. Writes nothing."""
        raise NotImplementedError


def _replace_file(path: Path, fill: Callable[[Path], object]) -> None:
    """Write `path` through a temporary sibling `.NAME.tmp-<uuid>` (filled by `fill`, fsynced)
    and one atomic rename: a reader sees the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        fill(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


class LocalBackend(Backend):
    """Local filesystem; compare-and-swap sections are serialised with ``flock``."""

    def _path(self, key: str) -> Path:
        return Path(self.location.root or "/") / key if key else Path(self.location.root or "/")

    def write_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            _replace_file(path, lambda tmp: tmp.write_bytes(data))
            _fsync_dir(path.parent)
        except OSError as exc:
            raise self.error("write", key, exc) from None

    def read_bytes(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except IsADirectoryError:
            raise self.error("read", key, "it is a directory, not a file") from None
        except OSError as exc:
            raise self.error("read", key, exc) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list_names(self, prefix: str) -> list[str]:
        folder = self._path(prefix)
        try:
            return sorted(p.name for p in folder.iterdir() if p.is_file())
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise self.error("list", prefix, exc) from None

    def list_recursive(self, prefix: str) -> list[str]:
        folder = self._path(prefix)
        if not folder.is_dir():
            return []
        return sorted(
            p.relative_to(folder).as_posix()
            for p in folder.rglob("*")
            if p.is_file() and not _INTERNAL_LOCAL_NAME.match(p.name)
        )

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise self.error("delete", key, exc) from None

    def upload_file(self, local: Path, key: str) -> None:
        path = self._path(key)
        try:
            _replace_file(path, lambda tmp: shutil.copyfile(local, tmp))
        except OSError as exc:
            raise self.error("upload to", key, exc) from None

    def download_file(self, key: str, local: Path) -> None:
        try:
            shutil.copyfile(self._path(key), local)
        except OSError as exc:
            raise self.error("download", key, exc) from None

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        lock = self._path(key).with_name(f".{self._path(key).name}.lock")
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise self.error("lock", key, exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def create_exclusive(self, key: str, data: bytes) -> bool:
        with self._locked(key):
            if self._path(key).exists():
                return False
            self.write_bytes(key, data)
            return True

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        if not self._path(key).exists():  # nothing to read: take no lock, so a read creates no folder
            return None
        with self._locked(key):
            data = self.read_bytes(key)
        return None if data is None else (data, hashlib.sha256(data).hexdigest())

    def replace_if_version(self, key: str, data: bytes, token: str) -> bool:
        with self._locked(key):
            current = self.read_bytes(key)
            if current is None or hashlib.sha256(current).hexdigest() != token:
                return False
            self.write_bytes(key, data)
            return True

    def delete_if_version(self, key: str, token: str) -> bool:
        with self._locked(key):
            current = self.read_bytes(key)
            if current is None or hashlib.sha256(current).hexdigest() != token:
                return False
            self.delete(key)
            return True

    def check_access(self) -> None:
        path = self._path("")
        existing = path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            what = "the folder" if existing == path else f"its nearest existing parent {existing}"
            raise self.error(
                "use", "", f"{what} is not a writable directory; choose a storage folder you can "
                "write to"
            )


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


class S3Backend(Backend):
    """S3 (or an S3-compatible server) through s3fs.

    Credentials and the endpoint come from ``storage_options`` or the environment
    (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``); they are only
    handed to s3fs, never stored.
    """

    def __init__(
        self, location: StorageLocation, secrets: list[str], storage_options: dict[str, Any]
    ) -> None:
        super().__init__(location, secrets)
        import s3fs  # deferred: 1.3 s import; file:// runs need no S3 client

        options = dict(storage_options)
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        client_kwargs = dict(options.pop("client_kwargs", None) or {})
        if "endpoint_url" in options:
            client_kwargs["endpoint_url"] = options.pop("endpoint_url")
        elif endpoint and "endpoint_url" not in client_kwargs:
            client_kwargs["endpoint_url"] = endpoint
        options.setdefault("use_listings_cache", False)
        options.setdefault("skip_instance_cache", True)
        try:
            self.fs = s3fs.S3FileSystem(client_kwargs=client_kwargs, **options)
        except Exception as exc:  # bad option names or values
            raise self.error("open", "", exc) from None

    def error(self, action: str, key: str, exc: BaseException | str) -> StorageError:
        """Like :meth:`Backend.error`, with the usual fix for the usual S3 failures."""
        err = super().error(action, key, exc)
        text = str(exc)
        if isinstance(exc, PermissionError):
            hint = (
                "check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the storage "
                "options key/secret) and their permissions on the bucket"
            )
        elif "bucket does not exist" in text.lower() or "NoSuchBucket" in text:
            hint = "create the bucket or correct the storage URL"
        elif "Could not connect" in text or "EndpointConnectionError" in type(exc).__name__:
            hint = "check AWS_ENDPOINT_URL (or the endpoint_url option) and that the server runs"
        else:
            return err
        return StorageError(f"{err}; {hint}.")

    def _full(self, key: str) -> str:
        return f"{self.location.root}/{key}" if key else self.location.root

    def _bucket_key(self, key: str) -> tuple[str, str]:
        bucket, _, prefix = self._full(key).partition("/")
        return bucket, prefix

    def write_bytes(self, key: str, data: bytes) -> None:
        try:
            self.fs.pipe_file(self._full(key), data)
        except Exception as exc:
            raise self.error("write", key, exc) from None

    def read_bytes(self, key: str) -> bytes | None:
        try:
            return self.fs.cat_file(self._full(key))
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise self.error("read", key, exc) from None

    def exists(self, key: str) -> bool:
        try:
            return bool(self.fs.isfile(self._full(key)))
        except Exception as exc:
            raise self.error("check", key, exc) from None

    def list_names(self, prefix: str) -> list[str]:
        try:
            entries = self.fs.ls(self._full(prefix), detail=True, refresh=True)
        except FileNotFoundError:
            return []
        except Exception as exc:
            raise self.error("list", prefix, exc) from None
        return sorted(e["name"].rsplit("/", 1)[-1] for e in entries if e.get("type") == "file")

    def list_recursive(self, prefix: str) -> list[str]:
        base = self._full(prefix).rstrip("/")
        try:
            names = self.fs.find(base, refresh=True)
        except FileNotFoundError:
            return []
        except Exception as exc:
            raise self.error("list", prefix, exc) from None
        return sorted(n[len(base) + 1 :] for n in names if n.startswith(base + "/"))

    def delete(self, key: str) -> None:
        try:
            self.fs.rm_file(self._full(key))
        except FileNotFoundError:
            pass
        except Exception as exc:
            raise self.error("delete", key, exc) from None

    def upload_file(self, local: Path, key: str) -> None:
        try:
            self.fs.put_file(str(local), self._full(key))
        except Exception as exc:
            raise self.error("upload to", key, exc) from None

    def download_file(self, key: str, local: Path) -> None:
        try:
            self.fs.get_file(self._full(key), str(local))
        except Exception as exc:
            raise self.error("download", key, exc) from None

    def _conditional_put(self, key: str, data: bytes, **condition: str) -> bool:
        bucket, obj = self._bucket_key(key)
        try:
            self.fs.call_s3("put_object", Bucket=bucket, Key=obj, Body=data, **condition)
        except Exception as exc:
            code = _s3_error_code(exc)
            if code in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            if code == "NotImplemented":
                raise self.error(
                    "write",
                    key,
                    "the S3 server does not support conditional writes (If-None-Match/If-Match), "
                    "which the run lease needs; use a server that does (AWS S3, SeaweedFS, MinIO)",
                ) from None
            raise self.error("write", key, exc) from None
        finally:
            self.fs.invalidate_cache(self._full(key))
        return True

    def create_exclusive(self, key: str, data: bytes) -> bool:
        return self._conditional_put(key, data, IfNoneMatch="*")

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        from fsspec.asyn import sync  # deferred: S3 only, like s3fs above

        bucket, obj = self._bucket_key(key)

        async def fetch() -> tuple[bytes, str]:
            resp = await self.fs._call_s3("get_object", Bucket=bucket, Key=obj)
            async with resp["Body"] as body:
                return await body.read(), resp["ETag"]

        try:
            return sync(self.fs.loop, fetch)
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise self.error("read", key, exc) from None

    def replace_if_version(self, key: str, data: bytes, token: str) -> bool:
        return self._conditional_put(key, data, IfMatch=token)

    def check_access(self) -> None:
        bucket = self.location.root.partition("/")[0]
        try:
            self.fs.call_s3("head_bucket", Bucket=bucket)
        except FileNotFoundError:
            raise StorageError(
                redact(f"cannot use {self.location.url()}: the bucket {bucket!r} does not exist; "
                       "create the bucket or correct the storage URL.", self._secrets)
            ) from None
        except Exception as exc:
            raise self.error("use", "", exc) from None

    def delete_if_version(self, key: str, token: str) -> bool:
        # S3 has no generally supported conditional DELETE: check the ETag, then delete. The
        # window between the two calls is a few milliseconds (documented in docs/storage.md).
        current = self.read_versioned(key)
        if current is None or current[1] != token:
            return False
        self.delete(key)
        return True


def _s3_error_code(exc: BaseException) -> str:
    for e in (exc, exc.__cause__, exc.__context__):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            return str(response.get("Error", {}).get("Code", ""))
    if isinstance(exc, OSError) and exc.errno == errno.EINVAL and "pre-condition" in str(exc):
        return "PreconditionFailed"
    return ""


def open_backend(url: str, storage_options: dict[str, Any] | None = None) -> Backend:
    """Parse ``url`` and open its backend; ``storage_options`` only apply to ``s3://``."""
    location = parse_storage_url(url)
    secrets = secret_values(storage_options)
    if location.protocol == "file":
        if storage_options:
            raise StorageError(
                f"storage options were given for the local storage {location.url()!r}; they "
                "only apply to s3:// URLs, so remove them."
            )
        return LocalBackend(location, secrets)
    return S3Backend(location, secrets, storage_options or {})
