"""`evomerge merge` does no harm to its inputs and leaves nothing behind: a source can never be
the output, a SIGTERM'd merge removes its temporary directory, a SIGKILL'd merge's directory is
removed by the next merge to the same output (a running merge's is kept), bad `--device` and
`--shard-size` fail before anything is created, the output has umask permissions, and a
missing tokenizer or differing vocabularies are reported."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_models import make_tiny_family, make_tiny_llama  # noqa: E402

from evomerge.flows.cli import main  # noqa: E402
from evomerge_core.io.model_files import TOKENIZER_FILES, LazyModelReader  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_tiny_family(tmp_path_factory.mktemp("safety"), n_finetunes=2)


def _cfg(f, **over) -> dict:
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(f["base"]),
        "models": [{"model": str(f["ft1"]), "parameters": {"weight": 0.6}},
                   {"model": str(f["ft2"]), "parameters": {"weight": 0.4}}],
        "dtype": "float32",
    }
    cfg.update(over)
    return cfg


def _write(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(tmp_path: Path, cfg: dict, out: Path, *extra: str) -> int:
    return main(["merge", str(_write(tmp_path, cfg)), str(out), "--no-progress", *extra])


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name)


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _errors(text: str) -> list[str]:
    return [line for line in text.strip().splitlines() if line.startswith("error:")]


# ------------------------------------------------------------------ a source is never the output


@pytest.mark.parametrize("where", ["is", "inside", "contains"])
def test_a_source_can_never_be_the_output(family, tmp_path, capsys, where):
    root = tmp_path / "models"
    f = make_tiny_family(root, n_finetunes=1) if where == "contains" else None
    f = f or {"base": family["base"], "ft1": shutil.copytree(family["ft1"], tmp_path / "ft1")}
    cfg = {"merge_method": "task_arithmetic", "base_model": str(f["base"]),
           "models": [{"model": str(f["ft1"]), "parameters": {"weight": 0.5}}]}
    out = {"is": f["ft1"], "inside": f["ft1"] / "sub", "contains": root}[where]
    if where == "inside":
        out.mkdir()
        (out / "x").write_text("x")
    before = _digest(Path(f["ft1"]))
    for extra in ([], ["--overwrite"]):  # the source error comes first, not "pass --overwrite"
        assert _run(tmp_path, cfg, out, *extra) == 2
        err = capsys.readouterr().err
        assert len(_errors(err)) == 1 and "source model" in err and "never writes over its inputs" in err, err
    assert _digest(Path(f["ft1"])) == before
    assert not _leftovers(Path(out).parent)


# ------------------------------------------------------------------ bad options fail up front


@pytest.mark.parametrize("extra, match", [
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--device", "cuda"], "no CUDA device"),
    (["--shard-size", "0"], "--shard-size must be a positive number of bytes"),
    (["--shard-size", "-5"], "--shard-size must be a positive number of bytes"),
])
def test_bad_device_or_shard_size_one_error_nothing_created(family, tmp_path, capsys, extra, match):
    if "cuda" in extra and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    out = tmp_path / "deep" / "out"
    assert _run(tmp_path, _cfg(family), out, *extra) == 2
    err = capsys.readouterr().err
    assert _errors(err) == [line for line in err.strip().splitlines() if line.strip()], err  # no traceback
    assert len(_errors(err)) == 1 and match in err, err
    assert not (tmp_path / "deep").exists()
    assert not _leftovers(tmp_path)


def test_output_has_umask_permissions(family, tmp_path):
    old = os.umask(0o022)
    try:
        assert _run(tmp_path, _cfg(family), tmp_path / "out") == 0
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "out" / "model.safetensors").stat().st_mode & 0o777 == 0o644


# ------------------------------------------------------------------ tokenizer and vocabulary notes


def test_base_without_tokenizer_gives_a_note_and_tokenizer_source_fixes_it(family, tmp_path, capsys):
    bare = shutil.copytree(family["base"], tmp_path / "bare")
    for name in TOKENIZER_FILES:
        (bare / name).unlink(missing_ok=True)
    cfg = _cfg(family, base_model=str(bare))
    assert _run(tmp_path, cfg, tmp_path / "a") == 0
    err = capsys.readouterr().err
    assert "has no tokenizer files, so the merged model has none" in err and "tokenizer_source" in err
    assert not any((tmp_path / "a" / n).exists() for n in TOKENIZER_FILES)
    assert _run(tmp_path, _cfg(family, base_model=str(bare), tokenizer_source=str(family["ft1"])), tmp_path / "b") == 0
    assert "no tokenizer files" not in capsys.readouterr().err
    assert (tmp_path / "b" / "tokenizer.json").read_bytes() == (family["ft1"] / "tokenizer.json").read_bytes()
    # naming a source without a tokenizer is an error, not a note
    named = _cfg(family, tokenizer_source=str(bare))
    named["models"][0]["model"] = str(bare)
    assert _run(tmp_path, named, tmp_path / "c") == 2
    assert "has no tokenizer files; name a model that has them" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_vocab_size_mismatch_is_noted(family, tmp_path, capsys):
    big = make_tiny_llama(tmp_path / "big", 7, vocab_size=72)
    cfg = _cfg(family)
    cfg["models"][1]["model"] = str(big)
    assert _run(tmp_path, cfg, tmp_path / "out") == 0
    err = capsys.readouterr().err
    assert "vocabulary sizes differ" in err and ": 72" in err and ": 64" in err
    assert "the 64 rows all models share are merged" in err
    assert LazyModelReader(tmp_path / "out").tensors["model.embed_tokens.weight"].shape[0] == 64
    assert _run(tmp_path, _cfg(family), tmp_path / "same") == 0
    assert "vocabulary sizes differ" not in capsys.readouterr().err


# ------------------------------------------------------------------ filters


def test_a_filter_that_matches_no_tensor_is_an_error(family, tmp_path, capsys):
    cfg = _cfg(family)
    cfg["models"][1]["parameters"]["weight"] = [{"filter": "block_sparse_moe", "value": 0.9}, {"value": 0.4}]
    assert _run(tmp_path, cfg, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert len(_errors(err)) == 1 and "filter 'block_sparse_moe' of parameter 'weight'" in err and "matches no tensor" in err
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path)
    cfg["models"][1]["parameters"]["weight"] = [{"filter": "mlp", "value": 0.9}, {"value": 0.4}]
    assert _run(tmp_path, cfg, tmp_path / "out") == 0


# ------------------------------------------------------------------ interrupted merges


def _deepen(src: Path, dst: Path, layers: int, seed: int) -> Path:
    """A `layers`-deep copy of a 2-layer tiny Llama (its layers repeated, plus seeded noise):
    a valid model directory with many tensors, written without building the model."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["num_hidden_layers"] = layers
    (dst / "config.json").write_text(json.dumps(cfg))
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, t in load_file(str(src / "model.safetensors")).items():
        if ".layers." not in name:
            tensors[name] = t + 0.01 * torch.randn(t.shape, generator=gen)
        elif name.startswith("model.layers.0."):
            for i in range(layers):
                tensors[name.replace(".layers.0.", f".layers.{i}.")] = t + 0.01 * torch.randn(t.shape, generator=gen)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def big_family(tmp_path_factory):
    """Enough tensors (32 layers of width 128) that a merge is mid-write for a while."""
    root = tmp_path_factory.mktemp("big")
    seed_model = make_tiny_llama(root / "seed", 0, hidden=128)
    return {name: _deepen(seed_model, root / name, 32, i) for i, name in enumerate(("base", "ft1", "ft2"))}


def _start(cfg_path: Path, out: Path) -> subprocess.Popen:
    code = "import sys; from evomerge.flows.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code, "merge", str(cfg_path), str(out), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _stopped_mid_write(cfg_path: Path, out: Path) -> tuple[subprocess.Popen, Path]:
    """A merge subprocess frozen (SIGSTOP) while its temporary directory holds a partial shard."""
    for _ in range(3):
        proc = _start(cfg_path, out)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            tmp = [p for p in out.parent.glob(f".{out.name}.tmp-*") if any(p.glob("*.safetensors"))]
            if tmp:
                os.kill(proc.pid, signal.SIGSTOP)
                if proc.poll() is None and tmp[0].exists():
                    return proc, tmp[0]
                break
            time.sleep(0.001)
        proc.kill()
        proc.wait()
        shutil.rmtree(out, ignore_errors=True)
    pytest.fail("could not catch the merge mid-write in 3 tries")


def test_sigterm_mid_write_leaves_nothing(big_family, tmp_path):
    out = tmp_path / "out"
    proc, tmp = _stopped_mid_write(_write(tmp_path, _cfg(big_family)), out)
    os.kill(proc.pid, signal.SIGTERM)
    os.kill(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert len(_errors(err)) == 1 and "terminated (SIGTERM)" in err and "Traceback" not in err, err
    assert not tmp.exists() and not out.exists() and not _leftovers(tmp_path)


def test_running_merges_temp_dir_is_kept_killed_ones_is_removed(big_family, tmp_path, capsys):
    out = tmp_path / "out"
    cfg_path = _write(tmp_path, _cfg(big_family))
    proc, tmp = _stopped_mid_write(cfg_path, out)
    try:
        # another merge to the same OUT_DIR while the frozen one is alive: its directory is kept
        assert main(["merge", str(cfg_path), str(out), "--no-progress"]) == 0
        assert tmp.is_dir() and "removed" not in capsys.readouterr().err
    finally:
        proc.kill()  # SIGKILL: no chance to clean up
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert tmp.is_dir() and any(tmp.glob("*.safetensors"))  # what SIGKILL leaves
    assert main(["merge", str(cfg_path), str(out), "--no-progress", "--overwrite"]) == 0
    assert f"removed {tmp.name}" in capsys.readouterr().err
    assert not tmp.exists() and not _leftovers(tmp_path)
    assert LazyModelReader(out).names() and json.loads((out / "config.json").read_text())


def test_dfs_output_has_umask_permissions(family, tmp_path):
    from evomerge_core.kinds.dfs_export import materialise_dfs
    from evomerge_core.spaces.dfs import DFSRecipe

    old = os.umask(0o022)
    try:
        out = materialise_dfs(DFSRecipe.identity("A", "B", 2), {"A": family["base"], "B": family["ft1"]}, tmp_path / "dfs")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755


def test_stale_cleanup_takes_only_dead_merges_of_this_out_dir_on_this_host(tmp_path):
    from evomerge_core.io.model_dir import remove_stale_temp_dirs, temp_prefix

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = temp_prefix(tmp_path / "out").split("-")[1]
    names = {
        f".out.tmp-{host}-{dead.pid}-a": False,  # a killed merge's output in progress
        f".out.old-{host}-{dead.pid}-b": False,  # a killed merge's previous output, moved aside
        f".out.tmp-{host}-{os.getppid()}-c": True,  # a live process
        f".out.tmp-00000000-{dead.pid}-d": True,  # another host (shared filesystem)
        f".other.tmp-{host}-{dead.pid}-e": True,  # another output directory
        ".out.tmp-abc": True,  # not ours
    }
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"x")
    removed = remove_stale_temp_dirs(tmp_path / "out")
    assert sorted(p.name for p in removed) == sorted(n for n, kept in names.items() if not kept)
    assert {n: (tmp_path / n).exists() for n in names} == names
