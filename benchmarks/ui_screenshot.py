"""Browser check of the UI monitoring: with the local stack running (`infra/local_stack.sh
start`), run a short toy-world evolution against it (candidates on the stack's Dask workers),
then open in headless Chromium the flow run page (docs/img/ui-flow-run.png), the run's latest
candidate table artifact (docs/img/ui-artifacts.png) and its best-recipe markdown artifact
(docs/img/ui-best.png). (The flow run page opens on its Logs tab: a URL cannot select the
Artifacts tab, so the artifacts are shot on their own pages, which link back to the run.)

    infra/local_stack.sh start
    python benchmarks/ui_screenshot.py [--out-dir docs/img] [--base-port 4200] [--flow-run-id ID]
    infra/local_stack.sh stop

With `--deployment CONFIG.yaml` the run is instead a run of the `evolve-config/evolve` deployment
(deployed with infra/deploy.sh, a worker of the evomerge-local pool running) on that config, and
the pages shot are the deployment run's: its Logs tab, its candidate table and its best-recipe
markdown with the inline fitness chart (docs/scale-out.md).

Exits non-zero when the run fails, Chromium is missing, or the screenshot is not written.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_evolution(api: str, dask: str, storage: str, run_key: str) -> str:
    """A 3-generation micro toy-world PS search; returns the flow run id."""
    import yaml

    from evomerge_core.toyworld.demo import search_config
    from evomerge_core.toyworld.zoo import build_zoo

    cfg = search_config(build_zoo("micro", progress=False), seed=0, evaluations=24, storage=storage, run_key=run_key)
    cfg["optimizer"] = {**cfg["optimizer"], "popsize": 8}
    cfg["fitness"] = {**cfg["fitness"], "test": None}
    cfg["runtime"] = {**cfg["runtime"], "torch_threads": 1, "task_runner": {"kind": "dask", "address": dask}}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.yaml"
        path.write_text(yaml.safe_dump(cfg))
        env = {**os.environ, "PREFECT_API_URL": api}
        subprocess.run([sys.executable, "-m", "evomerge.flows.cli", "evolve", str(path), "--no-resume"], env=env,
                       check=True, timeout=900)
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with SyncPrefectClient(api) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[f"evolve-{run_key}"])),
                                     sort=FlowRunSort.START_TIME_DESC, limit=1)
    if not runs or not runs[0].state.is_completed():
        raise SystemExit(f"the flow run evolve-{run_key} did not complete: {runs[0].state if runs else 'not found'}")
    return str(runs[0].id)


def run_deployment(api: str, config_path: str, run_key: str) -> str:
    """A run of the evolve-config/evolve deployment on `config_path`; returns its flow run id."""
    from prefect.client.orchestration import SyncPrefectClient

    with SyncPrefectClient(api) as client:
        deployment = client.read_deployment_by_name("evolve-config/evolve")
        run = client.create_flow_run_from_deployment(deployment.id, parameters={
            "config_path": config_path, "run_key": run_key, "resume": False})
        deadline = time.monotonic() + 900
        while not (run := client.read_flow_run(run.id)).state.is_final():
            if time.monotonic() > deadline:
                raise SystemExit(f"the deployment run {run.name} did not finish in 900 s: {run.state}")
            time.sleep(2)
    if not run.state.is_completed():
        raise SystemExit(f"the deployment run {run.name} did not complete: {run.state}")
    return str(run.id)


def screenshot(url: str, out: Path, wait_ms: int) -> None:
    """Headless Chromium screenshot of `url` (no network beyond loopback, throwaway profile)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        raise SystemExit("Chromium is not installed (Debian: apt-get install -y chromium)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="evomerge-chromium-") as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
               f"--user-data-dir={profile}", f"--virtual-time-budget={wait_ms}", f"--screenshot={out}",
               "--window-size=1400,1000", url]
        subprocess.run(cmd, check=True, timeout=180, capture_output=True)
    if not out.is_file() or out.stat().st_size < 10_000:
        raise SystemExit(f"no usable screenshot at {out}")


def latest_artifact(api: str, run_id: str, key_suffix: str) -> str:
    """The id of the flow run's newest artifact whose key ends with `key_suffix`."""
    from uuid import UUID

    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with SyncPrefectClient(api) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(run_id)])))
    found = sorted((a for a in arts if (a.key or "").endswith(key_suffix)), key=lambda a: a.created)
    if not found:
        raise SystemExit(f"flow run {run_id} has no artifact *{key_suffix}")
    return str(found[-1].id)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-port", type=int, default=int(os.environ.get("EVOMERGE_STACK_BASE_PORT", 4200)))
    parser.add_argument("--out-dir", type=Path, default=REPO / "docs" / "img")
    parser.add_argument("--flow-run-id", help="shoot this flow run instead of running a new evolution")
    parser.add_argument("--deployment", metavar="CONFIG", help="run the evolve-config/evolve deployment on this "
                        "config (a path on the worker) instead of `evomerge evolve` on the stack")
    parser.add_argument("--wait-ms", type=int, default=30000, help="virtual time each page gets to render")
    args = parser.parse_args()
    ui = f"http://127.0.0.1:{args.base_port}"
    api = f"{ui}/api"
    run_id = args.flow_run_id
    if run_id is None and args.deployment:
        run_id = run_deployment(api, args.deployment, run_key=f"ui-check-{int(time.time())}")
    if run_id is None:
        with tempfile.TemporaryDirectory() as tmp:
            run_id = run_evolution(api, f"tcp://127.0.0.1:{args.base_port + 1}", f"file://{tmp}/runs",
                                   run_key=f"ui-check-{int(time.time())}")
    pages = {
        "ui-flow-run.png": f"{ui}/runs/flow-run/{run_id}",
        "ui-artifacts.png": f"{ui}/artifacts/artifact/{latest_artifact(api, run_id, '-candidates')}",
        "ui-best.png": f"{ui}/artifacts/artifact/{latest_artifact(api, run_id, '-best')}",
    }
    for name, url in pages.items():
        screenshot(url, args.out_dir / name, args.wait_ms)
        print(f"screenshot of {url} -> {args.out_dir / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
