"""A small local stand-in for the Hugging Face Hub HTTP API, for tests (stdlib only).

It implements the calls huggingface_hub 2.x makes for ``create_repo``, ``create_branch``,
``upload_folder``/``create_commit`` (``/api/validate-yaml``, ``preupload``, ``commit`` with
base64 "regular" files, and the legacy LFS batch API + basic PUT transfer for files at or above
``lfs_threshold`` bytes), ``model_info``/``repo_info``, ``list_repo_tree`` and file
``resolve`` (HEAD and GET), which is what ``snapshot_download``/``hf_hub_download`` and
``from_pretrained`` use. Repositories live in memory; every commit is a full snapshot.

Auth: ``write_tokens`` may create repos and commit; ``read_tokens`` may only read (a write call
gets 403); any other bearer token gets 401, and so does a write call without a token. Private
repos are invisible (404) without a valid token, as on the Hub.

The server binds to 127.0.0.1 on a free port and runs in a daemon thread; ``stop()`` shuts it
down. ``requests`` records every request (method, path, whether it carried a token) so tests
can assert what the client did without the stub ever storing the token itself.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob (what the Hub reports as a regular file's oid/ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class StoredFile:
    data: bytes
    lfs: bool

    @property
    def etag(self) -> str:
        return hashlib.sha256(self.data).hexdigest() if self.lfs else git_blob_sha1(self.data)


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit sha
    commits: dict[str, dict[str, StoredFile]] = field(default_factory=dict)  # sha -> files

    def resolve(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None


@dataclass
class LoggedRequest:
    method: str
    path: str
    authenticated: bool


class HubStub:
    """In-memory Hub; start with :meth:`start`, stop with :meth:`stop`."""

    def __init__(self, *, write_tokens: tuple[str, ...] = (), read_tokens: tuple[str, ...] = (),
                 lfs_threshold: int | None = None) -> None:
        self.write_tokens = set(write_tokens)
        self.read_tokens = set(read_tokens)
        self.lfs_threshold = lfs_threshold
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[LoggedRequest] = []
        # answer the next N commit calls with `fail_status` (507: a failure the client does not
        # retry; huggingface_hub retries 408/429/5xx-gateway codes and 500 itself)
        self.fail_commits = 0
        self.fail_status = 507
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._clock = 0

    # Lifecycle --------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._server is not None, "start() the stub first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubStub:
        handler = type("Handler", (_Handler,), {"stub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="hubstub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = self._thread = None

    # Helpers for tests ------------------------------------------------------------------------
    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of a repo at a revision."""
        repo = self.repos[repo_id]
        return {p: f.data for p, f in repo.commits[repo.resolve(revision)].items()}

    def commit_count(self, repo_id: str) -> int:
        return len(self.repos[repo_id].commits) - 1  # minus the initial empty commit

    def new_commit(self, repo: Repo, branch: str, files: dict[str, StoredFile]) -> str:
        self._clock += 1
        sha = hashlib.sha1(f"{repo.repo_id}:{branch}:{self._clock}:{time.time_ns()}".encode()).hexdigest()
        repo.commits[sha] = files
        repo.branches[branch] = sha
        return sha

    def create_repo(self, repo_id: str, *, private: bool = False) -> Repo:
        repo = Repo(repo_id, private)
        self.repos[repo_id] = repo
        self.new_commit(repo, "main", {".gitattributes": StoredFile(b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n", False)})
        return repo


class _Error(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


class _Handler(BaseHTTPRequestHandler):
    stub: HubStub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    # Plumbing ---------------------------------------------------------------------------------
    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[len("Bearer "):] if auth.startswith("Bearer ") else None

    def _role(self) -> str | None:
        token = self._token()
        if token is None:
            return None
        if token in self.stub.write_tokens:
            return "write"
        if token in self.stub.read_tokens:
            return "read"
        raise _Error(401, "Invalid credentials in Authorization header")

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _dispatch(self) -> None:
        parts = urlsplit(self.path)
        path, query = parts.path, parse_qs(parts.query)
        with self.stub.lock:
            self.stub.requests.append(LoggedRequest(self.command, path, self._token() is not None))
        try:
            with self.stub.lock:
                self._route(path, query)
        except _Error as err:
            headers = {"X-Error-Code": err.code} if err.code else {}
            headers["X-Error-Message"] = err.message
            self._json(err.status, {"error": err.message, **err.extra}, headers)

    do_GET = do_POST = do_PUT = do_HEAD = _dispatch

    # Repos and auth ---------------------------------------------------------------------------
    def _repo(self, repo_id: str, *, write: bool = False) -> Repo:
        role = self._role()
        repo = self.stub.repos.get(repo_id)
        if repo is None or (repo.private and role is None):
            raise _Error(404 if role else 401, f"Repository {repo_id} not found", "RepoNotFound")
        if write:
            self._require_write(role)
        return repo

    @staticmethod
    def _require_write(role: str | None) -> None:
        if role is None:
            raise _Error(401, "You must be authenticated to write to the Hub")
        if role != "write":
            raise _Error(403, "You don't have the rights to write to this repository (read-only token)")

    def _commit_of(self, repo: Repo, revision: str) -> str:
        sha = repo.resolve(unquote(revision))
        if sha is None:
            raise _Error(404, f"Revision {revision} not found", "RevisionNotFound")
        return sha

    # Routes -----------------------------------------------------------------------------------
    def _route(self, path: str, query: dict[str, list[str]]) -> None:
        seg = [unquote(s) for s in path.strip("/").split("/")]
        m = self.command
        if m == "POST" and path == "/api/repos/create":
            return self._create_repo()
        if m == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml()
        if m == "GET" and path == "/api/whoami-v2":
            role = self._role()
            if role is None:
                raise _Error(401, "not logged in")
            return self._json(200, {"type": "user", "name": "stub-user", "auth": {"accessToken": {"role": role}}})
        if len(seg) >= 4 and seg[0] == "api" and seg[1] == "models":
            repo_id, rest = f"{seg[2]}/{seg[3]}", seg[4:]
            if m == "GET" and not rest:
                return self._model_info(repo_id, "main")
            if m == "GET" and rest[0] == "revision":
                return self._model_info(repo_id, "/".join(rest[1:]))
            if m == "POST" and rest[0] == "preupload":
                return self._preupload(repo_id, "/".join(rest[1:]))
            if m == "POST" and rest[0] == "commit":
                return self._commit(repo_id, "/".join(rest[1:]))
            if m == "POST" and rest[0] == "branch":
                return self._create_branch(repo_id, "/".join(rest[1:]))
            if m == "GET" and rest[0] == "tree":
                return self._tree(repo_id, rest[1], "/".join(rest[2:]))
        if m == "POST" and len(seg) == 6 and seg[1].endswith(".git") and seg[2:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(f"{seg[0]}/{seg[1][:-4]}")
        if m == "PUT" and len(seg) == 2 and seg[0] == "_lfs":
            return self._lfs_put(seg[1])
        if m in ("GET", "HEAD") and len(seg) >= 5 and seg[2] == "resolve":
            return self._resolve(f"{seg[0]}/{seg[1]}", seg[3], "/".join(seg[4:]))
        raise _Error(404, f"the hub stub does not implement {m} {path}")

    def _create_repo(self) -> None:
        self._require_write(self._role())
        payload = json.loads(self._body() or b"{}")
        name, org = payload.get("name"), payload.get("organization")
        repo_id = f"{org}/{name}" if org else f"stub-user/{name}"
        if repo_id in self.stub.repos:
            raise _Error(409, "You already created this model repo", url=f"{self.stub.url}/{repo_id}")
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        self.stub.create_repo(repo_id, private=private)
        self._json(200, {"url": f"{self.stub.url}/{repo_id}", "name": repo_id})

    def _validate_yaml(self) -> None:
        from huggingface_hub import ModelCard

        payload = json.loads(self._body() or b"{}")
        try:
            ModelCard(payload.get("content", ""), ignore_metadata_errors=False)
        except Exception as exc:  # what the Hub would reject
            return self._json(400, {"errors": [{"message": str(exc)}], "warnings": []})
        self._json(200, {"errors": [], "warnings": []})

    def _model_info(self, repo_id: str, revision: str) -> None:
        from huggingface_hub import ModelCard

        repo = self._repo(repo_id)
        sha = self._commit_of(repo, revision)
        files = repo.commits[sha]
        info: dict[str, Any] = {"id": repo_id, "sha": sha, "private": repo.private,
                                "siblings": [{"rfilename": p} for p in sorted(files)]}
        if "README.md" in files:
            data = ModelCard(files["README.md"].data.decode(), ignore_metadata_errors=True).data.to_dict()
            info.update(cardData=data, tags=data.get("tags"), pipeline_tag=data.get("pipeline_tag"),
                        library_name=data.get("library_name"))
        self._json(200, info)

    def _preupload(self, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_id, write=True)
        head = repo.commits.get(repo.resolve(unquote(revision)) or "", {})
        out = []
        for f in json.loads(self._body())["files"]:
            lfs = self.stub.lfs_threshold is not None and f["size"] >= self.stub.lfs_threshold
            existing = head.get(f["path"])
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                        "oid": existing.etag if existing is not None and existing.lfs == lfs else None})
        self._json(200, {"files": out, "commitOid": repo.resolve(unquote(revision))})

    def _commit(self, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_id, write=True)
        branch = unquote(revision)
        if branch not in repo.branches:
            raise _Error(404, f"Branch {branch} not found", "RevisionNotFound")
        if self.stub.fail_commits > 0:
            self.stub.fail_commits -= 1
            raise _Error(self.stub.fail_status, "Insufficient storage while committing (simulated by the hub stub)")
        files = dict(repo.commits[repo.branches[branch]])
        for line in self._body().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "file":
                files[value["path"]] = StoredFile(base64.b64decode(value["content"]), False)
            elif key == "lfsFile":
                data = self.stub.lfs_objects.get(value["oid"])
                if data is None:
                    raise _Error(400, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                files[value["path"]] = StoredFile(data, True)
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key != "header":
                raise _Error(400, f"the hub stub does not implement commit operation {key!r}")
        sha = self.stub.new_commit(repo, branch, files)
        self._json(200, {"commitUrl": f"{self.stub.url}/{repo_id}/commit/{sha}", "commitOid": sha,
                         "success": True})

    def _create_branch(self, repo_id: str, branch: str) -> None:
        repo = self._repo(repo_id, write=True)
        if branch in repo.branches:
            raise _Error(409, f"Branch {branch} already exists")
        payload = json.loads(self._body() or b"{}")
        start = self._commit_of(repo, payload.get("startingPoint") or "main")
        repo.branches[branch] = start
        self._json(200, {})

    def _tree(self, repo_id: str, revision: str, prefix: str) -> None:
        repo = self._repo(repo_id)
        files = repo.commits[self._commit_of(repo, revision)]
        entries, folders = [], set()
        for p, f in sorted(files.items()):
            if prefix and not p.startswith(prefix.rstrip("/") + "/"):
                continue
            for i in range(p.count("/")):
                folders.add("/".join(p.split("/")[: i + 1]))
            entry: dict[str, Any] = {"type": "file", "path": p, "size": len(f.data), "oid": git_blob_sha1(f.data)}
            if f.lfs:
                entry["lfs"] = {"oid": f.etag, "size": len(f.data), "pointerSize": 134}
            entries.append(entry)
        entries += [{"type": "directory", "path": d, "oid": "0" * 40} for d in sorted(folders)]
        self._json(200, entries)

    def _lfs_batch(self, repo_id: str) -> None:
        self._repo(repo_id, write=True)
        payload = json.loads(self._body())
        objects = [{"oid": o["oid"], "size": o["size"],
                    "actions": {"upload": {"href": f"{self.stub.url}/_lfs/{o['oid']}"}}}
                   for o in payload["objects"]]
        self._json(200, {"transfer": "basic", "objects": objects})

    def _lfs_put(self, oid: str) -> None:
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid:
            raise _Error(400, "LFS object does not match its oid")
        self.stub.lfs_objects[oid] = data
        self._json(200, {})

    def _resolve(self, repo_id: str, revision: str, filename: str) -> None:
        repo = self._repo(repo_id)
        sha = self._commit_of(repo, revision)
        stored = repo.commits[sha].get(filename)
        if stored is None:
            raise _Error(404, f"Entry {filename} not found", "EntryNotFound")
        headers = {"X-Repo-Commit": sha, "ETag": f'"{stored.etag}"'}
        if stored.lfs:
            headers["X-Linked-Etag"] = f'"{stored.etag}"'
            headers["X-Linked-Size"] = str(len(stored.data))
        self._send(200, stored.data, headers, content_type="application/octet-stream")
