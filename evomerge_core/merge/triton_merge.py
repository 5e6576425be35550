"""Fused Triton kernels for task-vector merges (TIES, DARE-TIES, task arithmetic) on GPUs.

The torch path of `evomerge_core.merge.kernels` runs about 25 elementwise kernels per chunk,
each a full round trip through memory; here every pass is one kernel that reads the bf16/fp16
sources once and keeps the float32 arithmetic in registers:

- the exact TIES threshold of each model: a fixed random sample of 65,536 magnitudes brackets
  the k-th largest between two sampled values; one pass counts the entries above, at and
  below the bracket and collects the few strictly inside; the threshold follows from the
  counts (with bf16 sources magnitudes are quantised and it usually is a bracket end) or from
  sorting the inside ones; when it has ties, one pass counting equal entries per block and
  one block scan find the cut index (ties kept lowest index first). A bracket that misses
  (rare; the pass detects it) falls back to radix selection on the float32 bit pattern of
  |d| (four 256-bin histogram passes);
- DARE keep masks from the same counter hash as `DareMasker` (identical masks on CPU/GPU);
- the L1 rescale sums, per block, summed in a fixed order;
- one combine pass: masks, weights, sign election, normalisation, lambda, + base, written in
  the output dtype.

Semantics, thresholds, cut indices and DARE masks are exactly those of the torch path; the
products that feed the TIES sign election are rounded separately (no fused multiply-add), so
the elected signs match too; other results agree to float32 rounding. Measured on an H100:
docs/benchmarks.md ("GPU path").

Used automatically for CUDA tensors when `triton` imports and at most `MAX_MODELS` non-base
models are merged; `EVOMERGE_TRITON=0` turns it off. On CPU it runs only under Triton's
interpreter (`TRITON_INTERPRET=1` and `EVOMERGE_TRITON=1`), which the tests use.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Sequence

import torch

from .sparsify import DareMasker, MagnitudeCut, TaskVectorSpec, dare_maskers, magnitude_k

MAX_MODELS = 4
_HIST_BLOCK = 4096
_COMBINE_BLOCK = 2048
_RADIX_SHIFTS = ((23, 0), (15, 0x7F800000), (7, 0x7FFF8000), (0, 0x7FFFFF80))  # (shift, bits fixed above)

_HAVE_TRITON = importlib.util.find_spec("triton") is not None  # imported only when used


def usable(device: torch.device, models: int) -> bool:
    """Whether the fused kernels run for this merge (device, model count, switch, import)."""
    if not _HAVE_TRITON or models > MAX_MODELS or models == 0:
        return False
    switch = os.environ.get("EVOMERGE_TRITON", "")
    if switch == "0":
        return False
    if device.type == "cuda":
        return True
    return switch == "1" and os.environ.get("TRITON_INTERPRET") == "1"


def _k():
    """The kernels module (importing triton and compiling lazily: CPU-only runs never pay for it)."""
    from . import triton_kernels  # deferred: imports triton and compiles kernels

    return triton_kernels


def _blocks(n: int, block: int) -> int:
    return (n + block - 1) // block


_SAMPLE = 1 << 16
SELECTIONS = {"bracket": 0, "radix": 0}  # how thresholds were found (diagnostics for benchmarks)
_SAMPLES: dict[tuple[int, str], torch.Tensor] = {}  # fixed sample positions per tensor size
_INT_MAX = 0x7FFFFFFF


def _sample_indices(n: int, device: torch.device) -> torch.Tensor:
    key = (n, str(device))
    idx = _SAMPLES.get(key)
    if idx is None:
        gen = torch.Generator(device=device).manual_seed(n)
        idx = torch.randint(0, n, (_SAMPLE,), generator=gen, device=device)
        if len(_SAMPLES) > 256:
            _SAMPLES.clear()
        _SAMPLES[key] = idx
    return idx


def magnitude_cuts(base: torch.Tensor, models: Sequence[torch.Tensor], ks: Sequence[int]) -> list[MagnitudeCut]:
    """The exact keep rule of the k_i largest |model_i - base| (1 <= k_i < n).

    A random sample of |d| brackets the k-th largest magnitude between two sampled values
    lo <= hi; one pass counts the entries above hi, equal to hi and equal to lo, and collects
    the few strictly between (sorted only when the k-th largest lies there: with bf16 sources
    magnitudes are quantised and it is usually lo or hi itself); when the k-th largest has
    ties, one pass counting equal entries per block finds the cut index. Exact whenever the
    bracket holds the k-th largest, which the pass verifies; otherwise (rare) radix selection.
    """
    cuts = _bracket_cuts(base, models, ks)
    missing = [i for i, c in enumerate(cuts) if c is None]
    SELECTIONS["bracket"] += len(cuts) - len(missing)
    SELECTIONS["radix"] += len(missing)
    if missing:
        for i, c in zip(missing, radix_cuts(base, [models[i] for i in missing], [ks[i] for i in missing])):
            cuts[i] = c
    return cuts  # type: ignore[return-value]


def _bracket_cuts(base: torch.Tensor, models: Sequence[torch.Tensor], ks: Sequence[int]) -> list[MagnitudeCut | None]:
    n = base.numel()
    device = base.device
    M = len(models)
    if n <= 4 * _SAMPLE:  # small: the bracket is everything
        bounds = [(0, _INT_MAX, n)] * M
    else:
        idx = _sample_indices(n, device)
        b_s = base.index_select(0, idx).float()
        desc = torch.stack([(x.index_select(0, idx).float() - b_s).abs_().view(torch.int32) for x in models])
        desc = desc.sort(dim=1, descending=True).values
        ranks = []
        for k in ks:
            q = k / n
            margin = 5.0 * (_SAMPLE * q * (1 - q)) ** 0.5 + 16
            ranks.append((int(q * _SAMPLE - margin), int(q * _SAMPLE + margin) + 1))
        cols = torch.tensor([[min(max(j, 0), _SAMPLE - 1) for j in r] for r in ranks], device=device)
        picks = desc.gather(1, cols).tolist()
        bounds = []
        for (j_hi, j_lo), (hi, lo) in zip(ranks, picks):
            # room for 16x the expected bracket; an overflow only costs the radix fallback
            cap = min(n, max(1 << 16, int(16 * n * (j_lo - max(j_hi, 0)) / _SAMPLE)))
            bounds.append((lo if j_lo < _SAMPLE else 0, hi if j_hi >= 0 else _INT_MAX, cap))
    counts = torch.zeros((M, 4), dtype=torch.int32, device=device)
    bands = [torch.empty(cap, dtype=torch.int32, device=device) for _, _, cap in bounds]
    for i, (x, (lo, hi, cap)) in enumerate(zip(models, bounds)):
        _k().band_kernel[(_blocks(n, _HIST_BLOCK),)](x, base, counts[i], bands[i], n, lo, hi, cap, BLOCK=_HIST_BLOCK)
    cuts: list[MagnitudeCut | None] = [None] * M
    tied: list[tuple[int, int, int]] = []  # (model, threshold bits, equal entries to keep)
    inner: list[tuple[int, int]] = []  # (model, rank of the wanted magnitude inside the interior)
    for i, ((above, at_hi, at_lo, inside), k, (lo, hi, cap)) in enumerate(zip(counts.tolist(), ks, bounds)):
        if k <= above or inside > cap or k > above + at_hi + inside + at_lo:
            continue  # the bracket missed the k-th largest: radix fallback
        if k <= above + at_hi:  # the k-th largest is hi itself (quantised magnitudes: common)
            cuts[i] = MagnitudeCut(_bits_to_float(hi), n)
            if k - above < at_hi:
                tied.append((i, hi, k - above))
        elif k > above + at_hi + inside:  # ... or lo
            cuts[i] = MagnitudeCut(_bits_to_float(lo), n)
            if k - above - at_hi - inside < at_lo:
                tied.append((i, lo, k - above - at_hi - inside))
        else:
            inner.append((i, k - above - at_hi))
    if inner:  # strictly inside the bracket: sort those few magnitudes
        sizes = counts[:, 3].tolist()
        vals = [bands[i][: sizes[i]] for i, _ in inner]
        thresholds = torch.stack([v.sort(descending=True).values[r - 1] for v, (_, r) in zip(vals, inner)])
        stats = torch.stack([torch.stack([(v > t).sum(), (v == t).sum()]) for v, t in zip(vals, thresholds)])
        for (i, rank), t, (greater, equal) in zip(inner, thresholds.tolist(), stats.tolist()):
            need = rank - greater  # equal entries kept, lowest index first
            cuts[i] = MagnitudeCut(_bits_to_float(t), n)
            if need < equal:
                tied.append((i, t, need))
    for i, cut in _tie_cuts(base, models, tied).items():
        cuts[i] = MagnitudeCut(cuts[i].threshold, cut)
    return cuts


def _tie_cuts(base: torch.Tensor, models: Sequence[torch.Tensor], tied: list[tuple[int, int, int]]) -> dict[int, int]:
    """{model: index of its `need`-th entry (0-based, ascending index) with |d| bits == value}."""
    if not tied:
        return {}
    n = base.numel()
    nb = _blocks(n, _HIST_BLOCK)
    per_block = torch.empty((len(tied), nb), dtype=torch.int32, device=base.device)
    for j, (i, value, _) in enumerate(tied):
        _k().count_equal_kernel[(nb,)](models[i], base, per_block[j], n, value, BLOCK=_HIST_BLOCK)
    cum = per_block.cumsum(1)
    need = torch.tensor([t[2] for t in tied], device=base.device)
    blk = torch.searchsorted(cum, need[:, None], right=True).squeeze(1)  # block of the first entry dropped
    before = torch.where(blk > 0, cum.gather(1, (blk - 1).clamp(min=0)[:, None]).squeeze(1), 0)
    local = (need - before).to(torch.int32)
    found = torch.empty(len(tied), dtype=torch.int64, device=base.device)
    for j, (i, value, _) in enumerate(tied):
        _k().kth_equal_kernel[(1,)](models[i], base, blk, local, found, n, value, j, BLOCK=_HIST_BLOCK)
    return {i: cut for (i, _, _), cut in zip(tied, found.tolist())}


def radix_cuts(base: torch.Tensor, models: Sequence[torch.Tensor], ks: Sequence[int]) -> list[MagnitudeCut]:
    """The exact keep rule of the k_i largest |model_i - base| (1 <= k_i < n), by radix selection."""
    n = base.numel()
    device = base.device
    grid = (_blocks(n, _HIST_BLOCK),)
    prefix = [0] * len(models)
    remaining = list(ks)  # rank (1-based, from the top) of the wanted entry among those matching prefix
    equal = [0] * len(models)
    hist = torch.zeros((len(models), 256), dtype=torch.int32, device=device)
    for shift, fixed in _RADIX_SHIFTS:
        hist.zero_()
        for i, x in enumerate(models):
            _k().radix_hist_kernel[grid](x, base, hist[i], n, prefix[i], fixed, shift, BLOCK=_HIST_BLOCK)
        counts = hist.cpu().tolist()
        for i, row in enumerate(counts):
            above = 0
            for digit in range(255, -1, -1):
                if above + row[digit] >= remaining[i]:
                    break
                above += row[digit]
            remaining[i] -= above
            prefix[i] = (prefix[i] & ~(255 << shift)) | (digit << shift)
            equal[i] = row[digit]
    ties = _tie_cuts(base, models, [(i, prefix[i], remaining[i]) for i in range(len(models)) if remaining[i] < equal[i]])
    return [MagnitudeCut(_bits_to_float(prefix[i]), ties.get(i, n)) for i in range(len(models))]


def _bits_to_float(bits: int) -> float:
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32)[0])


def _float_to_bits(value: float) -> int:
    return int(torch.tensor([value], dtype=torch.float32).view(torch.int32)[0])


def _dare_args(masker: DareMasker | None) -> tuple[int, int, int]:
    return (masker.mul, masker.add, masker.threshold) if masker is not None else (1, 0, 0)


def l1_sums(base: torch.Tensor, x: torch.Tensor, cut: MagnitudeCut | None, masker: DareMasker | None) -> tuple[float, float]:
    """(sum |d|, sum of the kept |d|) of one model's task vector d, for the L1 rescale."""
    n = base.numel()
    nb = _blocks(n, _HIST_BLOCK)
    sums = torch.empty((nb, 2), dtype=torch.float32, device=base.device)
    spars, thr, cut_i = _sparsity_args(cut, masker, n)
    mul, add, dthr = _dare_args(masker)
    _k().l1_kernel[(nb,)](x, base, sums, n, thr, cut_i, mul, add, dthr, SPARS=spars, BLOCK=_HIST_BLOCK)
    total = sums.double().sum(0).tolist()
    return total[0], total[1]


def _sparsity_args(cut: MagnitudeCut | None, masker: DareMasker | None, n: int) -> tuple[int, int, int]:
    if cut is not None:
        return 1, _float_to_bits(cut.threshold), cut.cut
    if masker is not None:
        return 2, 0, 0
    return 0, -1, n


def combine(out: torch.Tensor, base: torch.Tensor, models: Sequence[torch.Tensor], cuts: Sequence[MagnitudeCut | None],
            maskers: Sequence, scales: Sequence[float], weights: Sequence[float], *, consensus: bool, normalize: bool,
            lam: float, plain_div: float, safe_div: bool) -> None:
    """out = base + lam * combine_i(scale_i * keep_i * (model_i - base)), one fused pass (flat tensors)."""
    n = base.numel()
    M = len(models)
    pad = MAX_MODELS - M
    xs = list(models) + [base] * pad
    spars, thr, cut_i, mul, add, dthr = [], [], [], [], [], []
    for c, mk in zip(cuts, maskers):
        s_, t_, c_ = _sparsity_args(c, mk, n)
        m_, a_, q_ = _dare_args(mk)
        spars.append(s_), thr.append(t_), cut_i.append(c_), mul.append(m_), add.append(a_), dthr.append(q_)
    spars += [0] * pad
    thr += [-1] * pad
    cut_i += [n] * pad
    mul += [1] * pad
    add += [0] * pad
    dthr += [0] * pad
    sc = [float(s) for s in scales] + [0.0] * pad
    ws = [float(w) for w in weights] + [0.0] * pad
    _k().combine_kernel[(_blocks(n, _COMBINE_BLOCK),)](
        out, base, *xs, n, *thr, *cut_i, *mul, *add, *dthr, *sc, *ws, float(lam), float(plain_div),
        M=M, S0=spars[0], S1=spars[1], S2=spars[2], S3=spars[3], CONSENSUS=bool(consensus), NORMALIZE=bool(normalize),
        SAFE_DIV=bool(safe_div), EXACT=os.environ.get("TRITON_INTERPRET") != "1", BLOCK=_COMBINE_BLOCK)


def task_vector_merge(base: torch.Tensor, models: list[torch.Tensor], specs: Sequence[TaskVectorSpec], *,
                      sparsification: str | None, consensus: bool, normalize: bool, lam: float, rescale: bool,
                      flat_out: torch.Tensor) -> None:
    """`kernels.task_vector_merge` on flat contiguous tensors, fused (see the module docstring)."""
    n = base.numel()
    weights = [float(sp.weight) for sp in specs]
    live = list(range(len(models)))
    cuts: list = [None] * len(models)
    maskers: list = [None] * len(models)
    if sparsification == "magnitude":
        ks = [magnitude_k(float(sp.density), n) for sp in specs]
        live = [i for i in live if ks[i] > 0]
        todo = [i for i in live if ks[i] < n]
        if todo:
            for i, c in zip(todo, magnitude_cuts(base, [models[i] for i in todo], [ks[i] for i in todo])):
                cuts[i] = c
    elif sparsification == "random":
        for i, mk in dare_maskers(specs, base.device).items():
            maskers[i] = mk
    scales = list(weights)
    if rescale:
        for i in live:
            if cuts[i] is None and maskers[i] is None:
                continue
            before, after = l1_sums(base, models[i], cuts[i], maskers[i])
            if before >= 1e-7 and after >= 1e-7:
                scales[i] *= before / after
    wsum = sum(weights)
    live_weights = [weights[i] for i in live]
    if not live:
        flat_out.copy_(base)
        return
    combine(flat_out, base, [models[i] for i in live], [cuts[i] for i in live], [maskers[i] for i in live],
            [scales[i] for i in live], live_weights, consensus=consensus, normalize=normalize, lam=lam,
            plain_div=1.0 if abs(wsum) < 1e-8 else wsum, safe_div=bool(live_weights) and min(live_weights) > 1e-20)


def linear_merge(out: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float], *, normalize: bool,
                 total: float) -> None:
    """out = sum_i weight_i * tensor_i [/ total], one fused pass (flat tensors, at most MAX_MODELS)."""
    M = len(tensors)
    xs = list(tensors) + [tensors[0]] * (MAX_MODELS - M)
    ws = [float(w) for w in weights] + [0.0] * (MAX_MODELS - M)
    n = out.numel()
    _k().linear_kernel[(_blocks(n, _COMBINE_BLOCK),)](out, *xs, *ws, float(total), n, M=M, NORMALIZE=bool(normalize),
                                                  BLOCK=_COMBINE_BLOCK)
