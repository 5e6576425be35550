"""Merge speed of `evomerge merge` vs mergekit 0.1.5 on three ~1.1B-parameter bf16 models.

Builds (like merge_memory.py) a random TinyLlama-shaped base and two fine-tunes (base + noise)
as bf16 safetensors under a temp dir, then for each method runs, back to back and each in a
fresh process with the sources in the page cache:

  reference  one elementwise pass over the same bytes: every tensor of the three models read
             (memory-mapped) and a * x + b * y + c * z computed in float32 chunks, written as
             bf16 with the same writer as evomerge (the memory-bandwidth floor of a merge here)
  evomerge   `evomerge_core.merge.engine.merge_to_dir` (what `evomerge merge` runs)
  mergekit   `mergekit.merge.run_merge` with its CPU speed options (lazy_unpickle, num_threads;
             what `mergekit-yaml CONFIG OUT --lazy-unpickle -j THREADS` runs), same config

"seconds" is the merge itself, timed inside each child around the one call (imports and
interpreter start-up excluded, the same for all three); "process" is the child's whole wall
time; peak RSS is the child's `ru_maxrss`. Outputs are compared tensor by tensor (max
|difference|, share of entries that differ); DARE draws different random masks in the two
tools, so it is not compared.

Acceptance (issue 10): ties and dare_ties >= 10x faster than mergekit and <= 3x the
reference; linear and slerp no slower than mergekit; peak RSS no higher than mergekit's.

    python benchmarks/merge_speed.py [--methods linear,task_arithmetic,ties,dare_ties,slerp]
        [--skip-mergekit] [--keep DIR] [--json results.json] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_memory import build_model  # noqa: E402

METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "slerp")
WEIGHTS = {"m1": 0.6, "m2": 0.7}
DENSITY = 0.5


def recipe(root: Path, method: str) -> dict[str, Any]:
    """The merge config of `method` over base, m1, m2 (same YAML for both tools)."""
    b, m1, m2 = (str(root / k) for k in ("base", "m1", "m2"))
    if method == "linear":
        models = [{"model": m, "parameters": {"weight": w}} for m, w in ((b, 0.3), (m1, 0.3), (m2, 0.4))]
        return {"merge_method": "linear", "models": models, "dtype": "bfloat16"}
    if method == "slerp":
        return {"merge_method": "slerp", "base_model": b, "models": [{"model": b}, {"model": m1}],
                "parameters": {"t": 0.5}, "dtype": "bfloat16"}
    params = {} if method == "task_arithmetic" else {"density": DENSITY}
    models = [{"model": str(root / k), "parameters": {"weight": w, **params}} for k, w in WEIGHTS.items()]
    return {"merge_method": method, "base_model": b, "models": models, "dtype": "bfloat16"}


def warm(root: Path) -> None:
    """Read the source files once so both tools start from the page cache."""
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    for f in sorted(root.glob("*/*.safetensors")):
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(view):
                pass


def timed_child(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `cmd`; its wall time, peak RSS (ru_maxrss of that child), exit code, load average."""
    load = os.getloadavg()
    with tempfile.TemporaryFile() as fout, tempfile.TemporaryFile() as ferr:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fout, stderr=ferr, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        fout.seek(0)
        ferr.seek(0)
        out, err = fout.read().decode(errors="replace"), ferr.read().decode(errors="replace")
    code = proc.returncode
    if code != 0:
        raise RuntimeError(f"{cmd[0]} failed (exit {code}): {err.strip()[-2000:]}")
    inner = json.loads(out.strip().splitlines()[-1])["inner_seconds"]
    return {"seconds": inner, "process_seconds": wall, "peak_rss": usage.ru_maxrss * 1024, "load_before": load[0],
            "load_after": os.getloadavg()[0]}


def reference_child(root: str, out: str, threads: int) -> None:
    """The bandwidth reference, in this (fresh) process: prints one JSON line."""
    import torch

    from evomerge_core.io.model_files import PlannedTensor
    from evomerge_core.merge.fastio import DirectShardedWriter, MappedModel
    from evomerge_core.merge.kernels import cpu_parallelism, linear_merge

    torch.set_num_threads(threads)
    start = time.perf_counter()
    models = [MappedModel(Path(root) / k) for k in ("base", "m1", "m2")]
    names = models[0].names()
    info = models[0].reader.tensors
    Path(out).mkdir(parents=True)
    writer = DirectShardedWriter(Path(out), [PlannedTensor(n, torch.bfloat16, info[n].shape) for n in names], 5 * 10**9)
    with cpu_parallelism():  # the chunk threading evomerge's merge uses
        for pos, name in enumerate(names):
            if pos + 1 < len(names):
                for m in models:
                    m.prefetch(names[pos + 1])
            xs = [m.get(name) for m in models]
            linear_merge(xs, [0.3, 0.3, 0.4], normalize=False, out=writer.buffer(name))
            writer.commit(name)
            del xs
            for m in models:
                m.release(name)
    writer.close()
    print(json.dumps({"inner_seconds": time.perf_counter() - start}))


def evomerge_child(config: str, out: str, threads: int) -> None:
    """`evomerge merge` in-process: resolve the config, then merge_to_dir timed alone."""
    import torch

    from evomerge_core.merge.engine import merge_to_dir
    from evomerge_core.merge.mergekit_yaml import load_config

    torch.set_num_threads(threads)
    recipe = load_config(Path(config)).recipe
    sources = {e.model: Path(e.model) for e in recipe.models}
    if recipe.base_model:
        sources[recipe.base_model] = Path(recipe.base_model)
    start = time.perf_counter()
    merge_to_dir(recipe, sources, Path(out), progress=False)
    print(json.dumps({"inner_seconds": time.perf_counter() - start}))


def mergekit_child(config: str, out: str, threads: int) -> None:
    """mergekit's run_merge in-process with its CPU speed options, timed alone."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    options = MergeOptions(lazy_unpickle=True, num_threads=threads, quiet=True, copy_tokenizer=False, write_model_card=False)
    merge_config = MergeConfiguration.model_validate(yaml.safe_load(Path(config).read_text()))
    start = time.perf_counter()
    run_merge(merge_config, out, options)
    print(json.dumps({"inner_seconds": time.perf_counter() - start}))


def compare(a: Path, b: Path) -> dict[str, Any]:
    """max |a - b| and the share of differing entries over all tensors (bf16 outputs)."""
    import torch

    from evomerge_core.merge.fastio import MappedModel

    ma, mb = MappedModel(a), MappedModel(b)
    if sorted(ma.names()) != sorted(mb.names()):
        return {"same_names": False}
    worst, differ, total = 0.0, 0, 0
    for name in ma.names():
        x, y = ma.get(name), mb.get(name)
        if x.shape != y.shape:
            return {"same_names": True, "same_shapes": False, "tensor": name}
        d = (x.float() - y.float()).abs_()
        worst = max(worst, float(d.max())) if d.numel() else worst
        differ += int(torch.count_nonzero(d))
        total += d.numel()
        del x, y, d
        ma.release(name)
        mb.release(name)
    return {"same_names": True, "same_shapes": True, "max_abs_diff": worst, "differing_share": differ / max(total, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--skip-mergekit", action="store_true")
    parser.add_argument("--keep", type=Path, default=None, help="reuse/keep the models in this dir instead of a temp dir")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads for every tool (default: cores)")
    parser.add_argument("--_reference", nargs=2, metavar=("ROOT", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--_evomerge", nargs=2, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--_mergekit", nargs=2, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._reference:
        reference_child(args._reference[0], args._reference[1], args.threads)
        return 0
    if args._evomerge:
        evomerge_child(*args._evomerge, args.threads)
        return 0
    if args._mergekit:
        mergekit_child(*args._mergekit, args.threads)
        return 0
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        parser.error(f"unknown method {bad[0]!r}; choose from {', '.join(METHODS)}")
    root = args.keep or Path(tempfile.mkdtemp(prefix="evomerge-speed-", dir="/tmp"))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.platform(), "cpus": os.cpu_count(),
        "threads": args.threads, "uptime_start": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "methods": {},
    }
    try:
        for i, name in enumerate(("base", "m1", "m2")):
            if not (root / name / "config.json").exists():
                t = time.perf_counter()
                build_model(root / name, i)
                print(f"built {name} in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
        model_bytes = sum(f.stat().st_size for f in (root / "base").glob("*.safetensors"))
        results["source_model_gib"] = model_bytes / 2**30
        print(f"{args.threads} torch thread(s); {results['uptime_start']}")
        header = (f"{'method':<16}{'reference':>10}{'evomerge':>10}{'mergekit':>10}{'speed-up':>10}{'vs ref':>8}"
                  f"{'RSS evo':>9}{'RSS mk':>8}  {'max |diff|':>10} {'differ':>7}  acceptance")
        print(header, flush=True)
        ok_all = True
        for method in methods:
            cfg = root / f"{method}.yaml"
            cfg.write_text(json.dumps(recipe(root, method)))  # JSON is YAML
            row: dict[str, Any] = {}
            outs = {k: root / f"out-{method}-{k}" for k in ("reference", "evomerge", "mergekit")}
            for out in outs.values():
                shutil.rmtree(out, ignore_errors=True)
            warm(root)
            row["reference"] = timed_child([sys.executable, __file__, "--threads", str(args.threads), "--_reference", str(root),
                                            str(outs["reference"])], env)
            shutil.rmtree(outs["reference"], ignore_errors=True)
            warm(root)
            me = [sys.executable, __file__, "--threads", str(args.threads)]
            row["evomerge"] = timed_child(me + ["--_evomerge", str(cfg), str(outs["evomerge"])], env)
            if not args.skip_mergekit:
                warm(root)
                row["mergekit"] = timed_child(me + ["--_mergekit", str(cfg), str(outs["mergekit"])], env)
                if not method.startswith("dare"):
                    row["compare"] = compare(outs["evomerge"], outs["mergekit"])
            for out in outs.values():
                shutil.rmtree(out, ignore_errors=True)
            ours, ref = row["evomerge"], row["reference"]
            row["vs_reference"] = ours["seconds"] / ref["seconds"]
            checks = []
            if "mergekit" in row:
                mk = row["mergekit"]
                row["speedup"] = mk["seconds"] / ours["seconds"]
                row["rss_ok"] = ours["peak_rss"] <= mk["peak_rss"]
                checks.append(("RSS", row["rss_ok"]))
                if method in ("ties", "dare_ties"):
                    checks.append((">=10x", row["speedup"] >= 10))
                if method in ("linear", "slerp"):
                    checks.append(("<=mk", row["speedup"] >= 1))
            if method in ("ties", "dare_ties"):
                checks.append(("<=3x ref", row["vs_reference"] <= 3))
            row["acceptance"] = {k: bool(v) for k, v in checks}
            ok_all &= all(v for _, v in checks)
            results["methods"][method] = row
            gib = 2**30
            mk = row.get("mergekit")
            cmp = row.get("compare", {})
            print(f"{method:<16}{ref['seconds']:>9.1f}s{ours['seconds']:>9.1f}s"
                  + (f"{mk['seconds']:>9.1f}s{row['speedup']:>9.1f}x" if mk else f"{'-':>10}{'-':>10}")
                  + f"{row['vs_reference']:>7.2f}x{ours['peak_rss'] / gib:>6.2f}GiB"
                  + (f"{mk['peak_rss'] / gib:>5.2f}GiB" if mk else f"{'-':>8}")
                  + (f"  {cmp['max_abs_diff']:>10.3g} {cmp['differing_share']:>7.2%}" if "max_abs_diff" in cmp else f"  {'-':>10} {'-':>7}")
                  + "  " + ", ".join(f"{k} {'ok' if v else 'NO'}" for k, v in checks), flush=True)
        results["uptime_end"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        print(results["uptime_end"])
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
        return 0 if ok_all else 1
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
