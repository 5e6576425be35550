"""The fused Triton merge path (`evomerge_core.merge.triton_merge`) against the torch path.

On CPU machines the Triton kernels run under Triton's interpreter in a child process
(`TRITON_INTERPRET=1` must be set before triton is imported); on a CUDA machine the same checks
run compiled on the GPU: `python tests/core/test_triton_merge.py cuda`.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton") if __name__ != "__main__" else None


def run_checks(device: str) -> int:
    """Every case: thresholds and cut indices identical, merged values equal to float32 rounding."""
    import torch

    from evomerge_core.merge import kernels, triton_merge
    from evomerge_core.merge.kernels import TaskVectorSpec, task_vector_merge

    dev = torch.device(device)
    assert triton_merge.usable(dev, 3), "the Triton path is not active"
    gen = torch.Generator().manual_seed(0)
    checked = 0

    def sources(n: int, models: int, dtype: torch.dtype, quantized: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        base = torch.randn(n, generator=gen) * 0.02
        ms = [base + 0.002 * torch.randn(n, generator=gen) for _ in range(models)]
        if quantized:  # many exactly equal magnitudes: the cut index matters
            ms = [base + torch.round(m - base, decimals=3) for m in ms]
        return base.to(dtype).to(dev), [m.to(dtype).to(dev) for m in ms]

    for n, models, dtype, quantized in [(10007, 3, torch.bfloat16, False), (4096, 2, torch.bfloat16, True),
                                        (12289, 4, torch.float16, True), (3001, 1, torch.float32, False),
                                        (1, 2, torch.bfloat16, False), (300_007, 2, torch.bfloat16, True),
                                        (300_007, 2, torch.float32, False)]:
        base, ms = sources(n, models, dtype, quantized)
        # cut of every density against the torch path's selection
        for density in (0.0001, 0.3, 0.5, 0.97) if n <= 4 * 65536 else (0.5,):
            k = kernels.magnitude_k(density, n)
            if not 1 <= k < n:
                continue
            got = triton_merge.magnitude_cuts(base, ms, [k] * models)
            if n <= 4 * triton_merge._SAMPLE:  # the radix fallback (slow in the interpreter)
                assert triton_merge.radix_cuts(base, ms, [k] * models) == got
            else:  # the sampled bracket held the threshold (no fallback)
                assert triton_merge._bracket_cuts(base, ms, [k] * models) == got
            for x, cut in zip(ms, got):
                keys = (x.float() - base.float()).to(torch.bfloat16).view(torch.int16).bitwise_and(0x7FFF)
                want = kernels.magnitude_cut(keys, k, lambda idx, x=x, base=base: (x.float()[idx] - base.float()[idx]).abs())
                assert (cut.threshold, cut.cut) == (want.threshold, want.cut), (n, density, cut, want)
                d = (x.float() - base.float()).abs()
                kept = (d > cut.threshold) | ((d == cut.threshold) & (torch.arange(n, device=dev) < cut.cut))
                assert int(kept.sum()) == k
                checked += 1
        os.environ["EVOMERGE_TRITON"] = "0"
        ref = kernels.linear_merge(ms, [0.3, -0.5, 0.9, 0.25][:models], normalize=True)
        os.environ["EVOMERGE_TRITON"] = "1"
        got = kernels.linear_merge(ms, [0.3, -0.5, 0.9, 0.25][:models], normalize=True)
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-8)  # compiled Triton fuses multiply-adds
        if n > 4 * triton_merge._SAMPLE:  # large enough for the sampled bracket: the merges below suffice
            continue
        densities = [0.3, 1.0, 0.0001, 0.0][:models] if models > 2 else [0.5, 0.9][:models]
        specs = [TaskVectorSpec(w, d, seed=7 + i) for i, (w, d) in enumerate(zip([0.6, 0.7, -0.2, 1.3], densities))]
        for spars, consensus, normalize, rescale in itertools.product(
                ("magnitude", "random", None), (True, False), (True, False), (False, True)):
            lam = 0.7 if rescale == consensus else 1.0
            for out_dtype in (torch.float32, torch.bfloat16) if checked < 60 else (torch.float32,):
                kw = dict(sparsification=spars, consensus=consensus, normalize=normalize, lam=lam, rescale=rescale,
                          out_dtype=out_dtype)
                os.environ["EVOMERGE_TRITON"] = "0"
                ref = task_vector_merge(base, ms, specs, **kw).float()
                os.environ["EVOMERGE_TRITON"] = "1"
                got = task_vector_merge(base, ms, specs, **kw).float()
                if out_dtype == torch.float32:
                    # the L1 rescale factor is a float32 sum over the tensor, summed in another order:
                    # values differ by ~1e-7 relative, and where a TIES sign-election sum is that
                    # close to 0 the elected sign (and so the entry) may differ: a few entries
                    rtol = 1e-4 if rescale else 2e-6
                    off = ~torch.isclose(got, ref, rtol=rtol, atol=1e-9)
                    allowed = 0.002 if rescale and consensus else 0.0
                    assert float(off.float().mean()) <= allowed, (kw, float((got - ref).abs().max()), int(off.sum()))
                else:  # one bf16 rounding step at most
                    step = ref.abs().clamp_min(1e-30) * 2 ** -7
                    assert bool(((got - ref).abs() <= step).all()), kw
                if not rescale and out_dtype == torch.float32 and dev.type == "cpu":  # the interpreter
                    # computes op by op like torch; compiled Triton fuses multiply-adds (1-ulp differences),
                    # and the interpreter rounds float32 -> bf16 toward zero (compiled: to nearest even)
                    assert float((got != ref).float().mean()) < 0.01, kw
                checked += 1
    print(f"triton merge checks passed on {device}: {checked}")
    return 0


def test_triton_kernels_match_torch_path_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", EVOMERGE_TRITON="1")
    proc = subprocess.run([sys.executable, str(Path(__file__)), "cpu"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "triton merge checks passed on cpu" in proc.stdout


def test_triton_path_off_without_switch_on_cpu(monkeypatch):
    import torch

    from evomerge_core.merge import triton_merge

    monkeypatch.setenv("EVOMERGE_TRITON", "1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not triton_merge.usable(torch.device("cpu"), 2)  # compiled Triton needs a GPU
    monkeypatch.setenv("EVOMERGE_TRITON", "0")
    assert not triton_merge.usable(torch.device("cuda"), 2)
    monkeypatch.delenv("EVOMERGE_TRITON")
    assert not triton_merge.usable(torch.device("cuda"), triton_merge.MAX_MODELS + 1)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.exit(run_checks(sys.argv[1] if len(sys.argv) > 1 else "cuda"))
