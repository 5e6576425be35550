"""`evomerge evolve CONFIG.yaml [--run-key K] [--storage URL] [--no-resume]`: validate the
config and the fitness data, check the storage (access, no live run on the run key, a config
that may continue the stored run), all before any model is loaded; then run the evolve flow
locally against a temporary local Prefect API that this command owns (flows/local_server.py; set
PREFECT_API_URL to use a server). With the same run key and storage it continues an unfinished run."""

from __future__ import annotations

import argparse

from evomerge_core.config.schema import load_run_config, parse_run_config
from evomerge_core.runs.search import check_run_free


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `evomerge evolve`."""
    parser.add_argument("config", help="run config YAML (see docs/evolve.md)")
    parser.add_argument("--run-key", help="name of the run under the storage (default: config run_key, else a hash)")
    parser.add_argument("--storage", help="storage URL (file://DIR or s3://bucket/prefix); overrides the config")
    parser.add_argument("--no-resume", action="store_true",
                        help="start over even if the run key already holds a run (deletes it first); "
                             "by default an unfinished run is continued")


def run(args: argparse.Namespace) -> int:
    """Validate, preflight the fitness data and the storage, then run the flow."""
    config = load_run_config(args.config)
    overrides = {}
    if args.run_key:
        overrides["run_key"] = args.run_key
    if args.storage:
        overrides["storage"] = args.storage
    if overrides:
        config = parse_run_config({**config.model_dump(mode="json", exclude_unset=True), **overrides}, source=args.config)
    from evomerge.flows.local_server import local_api, using
    from evomerge.flows.prefect_api import check_api

    # Without PREFECT_API_URL a temporary API server of this process's own starts now and gets
    # ready while the checks run; it dies with this process (see flows/local_server.py).
    with local_api() as server:
        check_inputs(config)
        check_api()  # before the run store is touched
        check_run_free(config, resume=not args.no_resume)  # storage: reads only, writes nothing
        check_sources(config)  # last: it may download Hub sources
        with using(server):
            from evomerge.flows.evolve import evolve

            evolve(config.model_dump(mode="json"), resume=not args.no_resume, run_key=config.effective_run_key())
    return 0


def preflight(config) -> None:
    """Every check of the run's input (`check_inputs`, then `check_sources`), so bad input
    surfaces before anything is written or a flow starts."""
    check_inputs(config)
    check_sources(config)


def check_inputs(config) -> None:
    """The checks that need no model: load the fitness items (train, validation, test; per
    stage), local source paths exist, the device is present."""
    from evomerge_core.kinds.evaluate import preflight_run
    from evomerge_core.kinds.preflight import check_device_present

    preflight_run(config)
    check_local_sources(config)
    check_device_present(config)


def check_sources(config) -> None:
    """Resolve and check the sources as the flow will (the checks of `evomerge merge`, the
    search space, in-place merging)."""
    from evomerge_core.kinds.preflight import check_run_sources

    check_run_sources(config)


def check_local_sources(config) -> None:
    """A source given as a local path (or file:// URL) must be an existing directory; Hub ids
    and remote URLs are checked when the flow fetches them."""
    from pathlib import Path

    from evomerge_core.errors import SourceError
    from evomerge_core.sources.resolve import HUB_ID_RE

    refs = [s.model for s in config.sources]
    for stage in config.stages or []:
        refs += [s.get("model") for s in stage.sources or [] if isinstance(s, dict)]
    for ref in refs:
        if not isinstance(ref, str) or ref.startswith("@") or ("://" in ref and not ref.startswith("file://")):
            continue
        path = Path(ref.removeprefix("file://")).expanduser()
        if not path.is_dir() and (ref.startswith(("file://", ".", "/", "~")) or path.exists() or not HUB_ID_RE.match(ref)):
            raise SourceError(f"source model {ref!r} is not an existing directory or a Hub id (org/name[@revision]); check the path")
