"""`evomerge publish MODEL_DIR --repo-id ORG/NAME [--private] [--revision BRANCH] [--dry-run DIR]
[--run URL_OF_RUN]`: check the inputs (repo id, model dir, token, run) before anything starts,
then run the publish flow locally against a temporary local Prefect API this command owns
(flows/local_server.py; set PREFECT_API_URL to use a server)."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from evomerge_core.publish import hub as core
from evomerge_core.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `evomerge publish`."""
    parser.add_argument("model_dir", help="merged model directory (from `evomerge merge` or a run's best/)")
    parser.add_argument("--repo-id", required=True, help="Hub repository ORG/NAME (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", default="main", help="branch to commit to (created if missing; default main)")
    parser.add_argument("--dry-run", metavar="DIR", help="write the folder that would be pushed to DIR; push nothing")
    parser.add_argument("--run", metavar="URL", help="the evolve run (STORAGE/RUN_KEY) whose result, config and "
                        "fitness plot go on the card; it records the push so a re-run does not push twice")
    parser.add_argument("--license", help="the merged model's license (SPDX id), when it cannot be derived "
                        "from the sources; you vouch that every source allows it")
    parser.add_argument("--force-license", action="store_true", help="publish even though the sources' licenses "
                        "are unknown or conflict (license: other, each source's license listed)")
    parser.add_argument("--approve", action="store_true", help="pause the flow run before pushing until it is resumed")
    parser.add_argument("--token-secret-block", help="name of a Prefect Secret block holding the Hub token "
                        "(default: HF_TOKEN or the huggingface_hub login)")
    parser.add_argument("--shard-size", type=int, default=core.DEFAULT_SHARD_SIZE,
                        help="largest weight shard in bytes (default 5 GB; larger shards are resharded)")


def run(args: argparse.Namespace) -> int:
    """Check everything that can be checked locally, then run the flow."""
    core.check_repo_id(args.repo_id)
    core.check_model_dir(Path(args.model_dir))
    if args.shard_size < 1:
        raise UsageError(f"--shard-size must be positive, not {args.shard_size}")
    if args.dry_run is None and not args.token_secret_block:
        core.resolve_token()  # fail fast and clearly when there is no token
    if args.dry_run is not None:
        out = Path(args.dry_run)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise UsageError(f"--dry-run {out} exists and is not an empty directory; choose a new folder")
    from evomerge.flows.local_server import local_api, using
    from evomerge.flows.prefect_api import check_api

    check_api()
    with local_api() as server:  # without PREFECT_API_URL: a temporary API owned by this command
        check_publication(args)
        with using(server):
            from evomerge.flows.publish import publish

            publish(str(Path(args.model_dir).resolve()), args.repo_id, private=args.private, revision=args.revision,
                    dry_run=str(Path(args.dry_run).resolve()) if args.dry_run else None, run_url=args.run,
                    license=args.license, force_license=args.force_license, approve=args.approve,
                    token_secret_block=args.token_secret_block, endpoint=os.environ.get("HF_ENDPOINT") or None,
                    shard_size=args.shard_size)
    return 0


def check_publication(args: argparse.Namespace) -> None:
    """What the flow's staging step (`tasks.publish.stage_publication`) would refuse, checked the
    same way before the flow starts: the run (finished? readable?), the recipe and the sources'
    licenses. A refusal is one `error:` line (exit 2) instead of a failed flow run's traceback."""
    from evomerge.tasks.publish import hub_token

    try:
        token: str | None = hub_token(args.token_secret_block)
    except core.PublishError:
        token = None  # as in staging: only the sources' READMEs are read here
    with tempfile.TemporaryDirectory(prefix="evomerge-run-check-") as tmp:
        run = core.load_run(core.open_run(args.run), Path(tmp)) if args.run else None
        core.plan_publication(Path(args.model_dir), args.repo_id, run=run, license=args.license,
                              force_license=args.force_license,
                              fetch_readme=core.readme_fetcher(token, os.environ.get("HF_ENDPOINT") or None))
