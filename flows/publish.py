"""The publish flow: stage a merged model with its card, optionally wait for approval, push it
to the Hugging Face Hub, and record the push in the run store.

    stage_publication        card + folder (weights resharded to <= 5 GB), or the --dry-run DIR
    (approval pause)         optional, off by default: resume the flow run to push
    push_to_hub              create_repo(exist_ok=True) + upload_folder
    record_publication       published.json in the run store: a re-run does not push twice
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from evomerge.tasks.publish import discard_staging, push_to_hub, record_publication, stage_publication
from evomerge_core.publish import hub as core


@flow(name="publish", flow_run_name="publish-{repo_id}", validate_parameters=False)
def publish(model_dir: str, repo_id: str, private: bool = True, revision: str = "main", dry_run: str | None = None,
            run_url: str | None = None, license: str | None = None, force_license: bool = False,
            approve: bool = False, approval_timeout_s: int = 24 * 3600, token_secret_block: str | None = None,
            endpoint: str | None = None, shard_size: int = core.DEFAULT_SHARD_SIZE,
            source_paths: dict[str, str] | None = None, run_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Publish `model_dir` as `repo_id`; returns the outcome (see `core.summarise`).

    `run_url` (or, from the evolve flow, `run_config`) names the evolve run whose result, config
    and fitness plot go on the card and whose store keeps `published.json`. The token is read by
    the push task (Secret block `token_secret_block`, else HF_TOKEN / the login), never passed in.
    """
    core.check_repo_id(repo_id)
    staged = stage_publication(model_dir, repo_id, revision, dry_run, run_url, run_config, source_paths, license,
                               force_license, endpoint, shard_size, token_secret_block)
    if dry_run is not None:
        outcome = {"status": "dry-run", "folder": staged["folder"], "repo_id": repo_id, "files": staged["files"]}
        print(core.summarise(outcome), flush=True)
        return outcome
    try:
        if staged["already"] is not None:
            outcome = {"status": "already-published", **staged["already"]}
            print(core.summarise(outcome), flush=True)
            return outcome
        if approve:
            from prefect.flow_runs import pause_flow_run

            print(f"waiting for approval to push {len(staged['files'])} files to {repo_id}@{revision}: resume this "
                  "flow run (UI or `prefect flow-run resume`) to push", flush=True)
            pause_flow_run(timeout=approval_timeout_s)
        message = f"evomerge: publish the best model of run {staged['run_key']}" if staged["run_key"] else None
        push = push_to_hub(staged["folder"], repo_id, private, revision, endpoint, token_secret_block, message)
        if run_url or run_config:
            record_publication(push, staged["digest"], run_url, run_config)
    finally:
        if staged["temporary"]:
            discard_staging(staged["folder"])
    outcome = {"status": "pushed", **push, "digest": staged["digest"]}
    print(core.summarise(outcome), flush=True)
    return outcome


def publish_run_best(config: dict[str, Any], best_url: str | None, source_paths: dict[str, str]) -> dict[str, Any] | None:
    """The evolve flow's last step: publish `best/` to `output.publish.repo_id` when one is set
    (a no-op otherwise). `best/` is fetched from the run store into a temporary directory."""
    import tempfile
    from pathlib import Path

    from evomerge_core.config.schema import RunConfig
    from evomerge_core.runs.layout import open_store

    cfg = RunConfig.model_validate(config)
    target = cfg.output.publish
    if not target.repo_id:
        return None
    if best_url is None:
        raise core.PublishError("output.publish.repo_id is set but output.materialise_best is false, so there is no "
                                "model to publish; set materialise_best: true")
    with tempfile.TemporaryDirectory(prefix="evomerge-best-") as tmp:
        model_dir = open_store(cfg).get_dir("best", Path(tmp) / "best")
        return publish(str(model_dir), target.repo_id, private=target.private, source_paths=source_paths,
                       run_config=config, **_publish_options(target))


def _publish_options(target: Any) -> dict[str, Any]:
    """Optional publish settings a config may carry (revision, license, approval, secret block)."""
    names = ("revision", "license", "force_license", "approve", "token_secret_block", "endpoint")
    return {n: getattr(target, n) for n in names if getattr(target, n, None) is not None}
