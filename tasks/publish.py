"""Prefect tasks of the publish flow: thin wrappers around `evomerge_core.publish.hub`.

The Hub token is never a task parameter or a task result (Prefect records both): the push task
resolves it itself from a Prefect Secret block (by name), ``HF_TOKEN`` or the huggingface_hub
login, and hands it only to `HfApi`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from evomerge_core.publish import hub as core


def open_run_store(run_url: str | None, run_config: dict[str, Any] | None):
    """The run store named by an evolve config (storage options included) or a run URL."""
    if run_config is not None:
        from evomerge_core.config.schema import RunConfig
        from evomerge_core.runs.layout import open_store

        return open_store(RunConfig.model_validate(run_config))
    return core.open_run(run_url) if run_url else None


def hub_token(secret_block: str | None = None) -> str:
    """The Hub token: the named Prefect Secret block, else `HF_TOKEN`/the login."""
    if secret_block:
        from prefect.blocks.system import Secret

        try:
            value = Secret.load(secret_block).get()
        except ValueError:
            raise core.PublishError(f"Prefect Secret block {secret_block!r} does not exist; create it with "
                                    "`prefect block create secret` or leave out the block name") from None
        if not isinstance(value, str) or not value:
            raise core.PublishError(f"Prefect Secret block {secret_block!r} does not hold a token string")
        return value
    return core.resolve_token()


@task(name="stage_publication", task_run_name="stage-{repo_id}", cache_policy=NO_CACHE)
def stage_publication(model_dir: str, repo_id: str, revision: str = "main", dry_run: str | None = None,
                      run_url: str | None = None, run_config: dict[str, Any] | None = None,
                      source_paths: dict[str, str] | None = None, license: str | None = None,
                      force_license: bool = False, endpoint: str | None = None,
                      shard_size: int = core.DEFAULT_SHARD_SIZE, token_secret_block: str | None = None) -> dict[str, Any]:
    """Build the card and stage the folder (the dry-run DIR, else a temporary folder); returns
    ``{folder, digest, files, temporary, already}`` (``already``: the recorded identical push)."""
    store = open_run_store(run_url, run_config)
    try:
        token: str | None = hub_token(token_secret_block)
    except core.PublishError:
        token = None  # staging only reads sources' READMEs; the push task insists on a token
    with tempfile.TemporaryDirectory(prefix="evomerge-run-") as work:
        run = core.load_run(store, Path(work)) if store is not None else None
        pub = core.plan_publication(model_dir, repo_id, run=run, source_paths=source_paths, license=license,
                                    force_license=force_license, fetch_readme=core.readme_fetcher(token, endpoint))
        if dry_run is not None:
            folder = core.stage_folder(pub, dry_run, shard_size=shard_size)
        else:
            parent = tempfile.mkdtemp(prefix="evomerge-publish-", dir=core._staging_parent(Path(model_dir)))
            folder = core.stage_folder(pub, Path(parent) / "upload", shard_size=shard_size)
    digest = core.folder_digest(folder)
    already = core.find_publication(store, repo_id, revision, digest) if store is not None and dry_run is None else None
    files = sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file())
    return {"folder": str(folder), "digest": digest, "files": files, "temporary": dry_run is None,
            "already": already, "run_key": run.result.get("run_key") if run else None}


@task(name="push_to_hub", task_run_name="push-{repo_id}", cache_policy=NO_CACHE)
def push_to_hub(folder: str, repo_id: str, private: bool = True, revision: str = "main", endpoint: str | None = None,
                token_secret_block: str | None = None, commit_message: str | None = None) -> dict[str, Any]:
    """`create_repo(exist_ok=True)` + `upload_folder`; returns the push record (no token)."""
    token = hub_token(token_secret_block)
    return core.push_folder(folder, repo_id, token=token, private=private, revision=revision, endpoint=endpoint,
                            commit_message=commit_message)


@task(name="record_publication", cache_policy=NO_CACHE)
def record_publication(push: dict[str, Any], digest: str, run_url: str | None = None,
                       run_config: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Append the push to the run's `published.json` (so a re-run does not push twice)."""
    store = open_run_store(run_url, run_config)
    return core.record_publication(store, push, digest) if store is not None else None


@task(name="discard_staging", cache_policy=NO_CACHE)
def discard_staging(folder: str) -> None:
    """Remove a temporary staging folder (never the model directory: staging is a new folder)."""
    import shutil

    shutil.rmtree(Path(folder).parent, ignore_errors=True)
