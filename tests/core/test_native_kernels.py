"""The C merge kernels (evomerge_core/merge/cpu_kernels.c): build, use, agreement with the
torch path, and what happens without a compiler. test_merge_kernels.py runs every kernel test
on both paths against the plain reference code."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evomerge_core.merge import kernels, native
from evomerge_core.merge.kernels import TaskVectorSpec, task_vector_merge

HAVE_CC = shutil.which(os.environ.get("CC", "cc")) is not None
needs_cc = pytest.mark.skipif(not HAVE_CC, reason="no C compiler on this machine")


def _merge(env: str, base, tensors, specs, **kw) -> torch.Tensor:
    before = os.environ.get("EVOMERGE_NATIVE")
    os.environ["EVOMERGE_NATIVE"] = env
    try:
        return task_vector_merge(base, tensors, specs, **kw)
    finally:
        if before is None:
            del os.environ["EVOMERGE_NATIVE"]
        else:
            os.environ["EVOMERGE_NATIVE"] = before


def _family(n: int, dtype: torch.dtype, models: int = 2, noise: float = 0.002, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g) * 0.02
    return base.to(dtype), [(base + noise * torch.randn(n, generator=g)).to(dtype) for _ in range(models)]


@needs_cc
def test_the_kernels_build_and_are_cached_where_a_compiler_exists():
    lib = native.library()
    assert lib is not None
    assert lib.max_models >= 4 and lib.has_f16
    assert list(native.cache_dir().glob("cpu_kernels-*.so"))


@needs_cc
def test_cpu_merges_take_the_native_path(monkeypatch):
    calls = []
    for name in ("_native_cuts", "_native_dare_sums", "_native_combine"):
        real = getattr(kernels._TaskVectorJob, name)

        def spy(self, *a, _real=real, _name=name, **k):
            calls.append(_name)
            return _real(self, *a, **k)

        monkeypatch.setattr(kernels._TaskVectorJob, name, spy)
    base, tensors = _family(5000, torch.bfloat16)
    specs = [TaskVectorSpec(0.6, 0.5, seed=1), TaskVectorSpec(0.7, 0.3, seed=2)]
    monkeypatch.delenv("EVOMERGE_NATIVE", raising=False)
    for sp in ("magnitude", "random"):
        task_vector_merge(base, tensors, specs, sparsification=sp, consensus=True, normalize=True, lam=1.0, rescale=True)
    assert calls == ["_native_cuts", "_native_combine", "_native_dare_sums", "_native_combine"]
    calls.clear()
    monkeypatch.setenv("EVOMERGE_NATIVE", "0")
    task_vector_merge(base, tensors, specs, sparsification="magnitude", consensus=True, normalize=True, lam=1.0, rescale=False)
    assert calls == []


@needs_cc
@pytest.mark.parametrize("dtype,out_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
                                             (torch.float32, torch.float16)])
def test_native_equals_the_torch_path_on_several_parts_with_threads(monkeypatch, dtype, out_dtype):
    monkeypatch.setattr(kernels, "_HIST_PART", 50_000)  # the tie search crosses parts
    n = 3 * 65536 + 4321
    base, tensors = _family(n, dtype, models=3)
    specs = [TaskVectorSpec(0.6, 0.5, seed=5), TaskVectorSpec(0.7, 0.05, seed=6), TaskVectorSpec(-0.2, 0.9, seed=7)]
    for sp in (None, "magnitude", "random"):
        for consensus, normalize, lam in ((True, True, 1.0), (True, False, 0.8), (False, True, 1.2)):
            kw = dict(sparsification=sp, consensus=consensus, normalize=normalize, lam=lam, rescale=False, out_dtype=out_dtype)
            want = _merge("0", base, tensors, specs, **kw)
            with kernels.cpu_parallelism(2):
                got = _merge("1", base, tensors, specs, **kw)
            assert got.dtype == out_dtype
            assert torch.equal(got, want), (sp, consensus, normalize, lam)


@needs_cc
def test_native_dare_rescale_agrees_to_float32_rounding():
    base, tensors = _family(200_003, torch.float32)
    specs = [TaskVectorSpec(0.6, 0.3, seed=5), TaskVectorSpec(0.7, 0.6, seed=6)]
    kw = dict(sparsification="random", consensus=True, normalize=True, lam=1.0, rescale=True)
    want, got = _merge("0", base, tensors, specs, **kw), _merge("1", base, tensors, specs, **kw)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-8)  # outputs ~0.02: a few ulp
    assert not torch.equal(got, base)


@needs_cc
def test_infinite_magnitudes_use_the_torch_selection():
    base, tensors = _family(10_000, torch.float32)
    tensors[0][17] = float("inf")
    tensors[0][400] = float("-inf")
    specs = [TaskVectorSpec(0.6, 1e-4), TaskVectorSpec(0.7, 0.5)]
    kw = dict(sparsification="magnitude", consensus=True, normalize=True, lam=1.0, rescale=False)
    want, got = _merge("0", base, tensors, specs, **kw), _merge("1", base, tensors, specs, **kw)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def test_unsupported_dtypes_fall_back_to_the_torch_ops():
    base, tensors = _family(1000, torch.float64)
    assert native.usable(torch.device("cpu"), [base, *tensors], torch.empty(1000)) is None
    specs = [TaskVectorSpec(0.6, 0.5), TaskVectorSpec(0.7, 0.5)]
    out = task_vector_merge(base, tensors, specs, sparsification="magnitude", consensus=True, normalize=True, lam=1.0, rescale=False)
    assert out.dtype == torch.float32 and not torch.equal(out, base.float())


_CHILD = """
import logging, torch
logging.basicConfig(level=logging.WARNING)
from evomerge_core.merge.kernels import TaskVectorSpec, task_vector_merge
from evomerge_core.merge import native
b = torch.randn(1000)
out = task_vector_merge(b, [b + 0.1, b - 0.2], [TaskVectorSpec(0.5, 0.5), TaskVectorSpec(0.5, 0.5)],
                        sparsification="magnitude", consensus=True, normalize=True, lam=1.0, rescale=False)
assert native.library() is None
print("merged", out.shape[0])
"""


@pytest.mark.parametrize("cc,message", [("/nonexistent/cc", "no C compiler found (set CC)"),
                                        ("false", "could not build the C merge kernels")])
def test_without_a_working_compiler_the_merge_runs_on_torch_ops_and_says_so(tmp_path, cc, message):
    env = {**os.environ, "CC": cc, "EVOMERGE_NATIVE_CACHE": str(tmp_path / "cache")}
    env.pop("EVOMERGE_NATIVE", None)
    run = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[2])
    assert run.returncode == 0, run.stderr
    assert "merged 1000" in run.stdout
    assert message in run.stderr
    assert not list((tmp_path / "cache").glob("*.so")) and not list((tmp_path / "cache").glob("*.tmp*"))
