"""Fast merge kernels: the merge methods on one tensor, in cache-sized chunks.

Every kernel reads its inputs in their own dtype (bf16, fp16 or fp32), does the arithmetic in
float32 (float64 for SLERP's angle) and writes the result once, into `out` (any float dtype).
The work is split into chunks of `chunk_elements(device)` elements, so on CPU the
intermediates of a chunk stay in cache; comparisons that would produce boolean tensors (slow
on CPU) are replaced by arithmetic (`hardshrink`, `copysign`, `sign`, `clamp`). Scratch memory
comes from a per-thread workspace that is reused across calls (fresh pages are expensive),
see `release_workspace`. The same code runs on CUDA with one large chunk. Task-vector merges
on CPU run their passes as fused C loops when the C kernels build (`native`, bit-identical
results); on CUDA as fused Triton kernels (`triton_merge`).

Semantics are those of `evomerge_core.merge.methods` (mergekit 0.1.5), with these exact rules:

- TIES keeps exactly k = max(1, int(density * numel)) entries of largest |model - base|;
  entries equal to the k-th largest magnitude are kept lowest index first. The threshold is
  found by selection, without a sort: a 32768-bin histogram of the bf16-rounded magnitudes
  (rounding is monotone, so the k-th largest lies in one known bin), then a histogram of the
  float32 bit patterns (at most 2^16 + 1 consecutive values) of the
  entries of that bin only. Results are bit-identical to the straightforward float32 code.
- DARE keeps each entry with probability density, drawn from a counter-based hash of
  (seed, index) with 16-bit resolution (density is rounded to a multiple of 2^-16), so the
  mask of an entry does not depend on chunking, thread count or device (CPU and CUDA agree).
"""

from __future__ import annotations

import ctypes
import itertools
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch

from evomerge_core.errors import MergeError

from . import native, triton_merge
from .sparsify import DareMasker, MagnitudeCut, TaskVectorSpec, dare_maskers, magnitude_k
from .workspace import WS as _WS

CPU_CHUNK = 1 << 18
CUDA_CHUNK = 1 << 26
_BUCKETS = 1 << 15  # non-negative bf16 bit patterns 0 .. 0x7FFF


def chunk_elements(device: torch.device | str) -> int:
    """Elements per chunk: cache-sized on CPU, large on accelerators (fewer launches)."""
    return CPU_CHUNK if torch.device(device).type == "cpu" else CUDA_CHUNK


def _ranges(n: int, chunk: int) -> list[tuple[int, int]]:
    return [(s, min(n, s + chunk)) for s in range(0, n, chunk)]


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1) if t.is_contiguous() else t.contiguous().reshape(-1)


# --------------------------------------------------------------------------- CPU parallelism
#
# torch's own intra-op threads (OpenMP) synchronise at the end of every op; with the many
# cache-sized ops of a chunked kernel, a busy core (a shared machine) stalls every op. Inside
# `cpu_parallelism` torch runs single-threaded and whole chunks are spread over Python threads
# instead (torch releases the GIL), taken from a shared counter: a slow thread just takes fewer
# chunks. Results never depend on the number of threads (per-chunk partial sums are combined in
# chunk order).

_STATE = threading.local()
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


@contextmanager
def cpu_parallelism(workers: int | None = None) -> Iterator[int]:
    """Run kernel chunk loops on `workers` threads (default: torch's thread count), with
    torch's intra-op threads set to 1 meanwhile (restored on exit). Nested use keeps the outer
    setting."""
    if getattr(_STATE, "workers", 0):
        yield _STATE.workers
        return
    before = torch.get_num_threads()
    workers = max(1, int(workers if workers is not None else before))
    _STATE.workers = workers
    if workers > 1:
        torch.set_num_threads(1)
    try:
        yield workers
    finally:
        _STATE.workers = 0
        if workers > 1:
            torch.set_num_threads(before)


def _pool(workers: int) -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers < workers:  # noqa: SLF001
            _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="evomerge-kernel")
        return _POOL


def _for_each(count: int, fn: Callable[[int], None], device: torch.device) -> None:
    """fn(0) .. fn(count - 1), spread over the `cpu_parallelism` threads on CPU."""
    workers = min(getattr(_STATE, "workers", 0) or 1, count)
    if workers <= 1 or device.type != "cpu":
        for i in range(count):
            fn(i)
        return
    counter = itertools.count()

    def worker() -> None:
        torch.set_num_threads(1)
        for i in iter(lambda: next(counter), None):
            if i >= count:
                return
            fn(i)

    futures = [_pool(workers).submit(worker) for _ in range(workers - 1)]
    error: BaseException | None = None
    try:
        worker()
    except BaseException as exc:  # let the other threads finish, then raise
        error = exc
    for f in futures:
        try:
            f.result()
        except BaseException as exc:
            error = error or exc
    if error is not None:
        raise error


def _check_inputs(tensors: Sequence[torch.Tensor], base: torch.Tensor | None) -> tuple[torch.Size, torch.device]:
    ref = base if base is not None else tensors[0]
    for t in tensors:
        if t.shape != ref.shape:
            raise MergeError(f"tensors to merge have shapes {list(t.shape)} and {list(ref.shape)}; they must match")
        if t.device != ref.device:
            raise MergeError(f"tensors to merge are on {t.device} and {ref.device}; put them on one device")
    return ref.shape, ref.device


def _output(out: torch.Tensor | None, shape: torch.Size, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != tuple(shape) or not out.is_contiguous():
        raise MergeError(f"output buffer has shape {list(out.shape)}, expected a contiguous {list(shape)}")
    return out


# --------------------------------------------------------------------------- TIES threshold


def magnitude_cut(keys: torch.Tensor, k: int, exact_abs: Callable[[torch.Tensor], torch.Tensor]) -> MagnitudeCut:
    """The keep rule for the k (1 <= k <= n) largest magnitudes, by selection.

    `keys`: int16, one per entry, non-negative and monotone in |d| (bf16 bits of |d|);
    `exact_abs(idx)`: the exact float32 |d| at the ascending flat indices `idx`.
    """
    bucket, rank = bucket_of_kth(torch.bincount(keys, minlength=_BUCKETS), k)
    idx = _indices_equal(keys, bucket)
    return cut_in_bucket(idx, exact_abs(idx).view(torch.int32), rank, keys.numel())


def bucket_of_kth(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """(bucket, rank): the k-th largest key is the rank-th largest entry of `bucket`, given
    the histogram `hist` of the keys."""
    at_least = hist.flip(0).cumsum(0).flip(0)  # at_least[b] = #entries with key >= b
    bucket = int((at_least >= k).sum()) - 1  # highest bucket with >= k entries at or above it
    above = int(at_least[bucket]) - int(hist[bucket])
    return bucket, k - above


def cut_in_bucket(idx: torch.Tensor, bits: torch.Tensor, rank: int, n: int) -> MagnitudeCut:
    """The cut that keeps the rank-th largest of one bucket's entries (ascending flat indices
    `idx`, float32 bits of their |d| `bits`) and everything above it, of n entries."""
    # The bucket's magnitudes round to one bf16 value, so their float32 bit patterns span at
    # most 2^16 + 1 consecutive integers: a histogram finds the rank-th largest exactly
    # (cheaper than `kthvalue` when the bucket holds millions of entries).
    low = int(bits.min())
    hist = torch.bincount(bits - low)
    at_least = hist.flip(0).cumsum(0).flip(0)
    t = int((at_least >= rank).sum()) - 1
    need = rank - (int(at_least[t]) - int(hist[t]))  # equal entries kept, lowest index first
    ties = idx[bits == low + t]
    cut = int(ties[need]) if need < ties.numel() else n
    return MagnitudeCut(float(torch.tensor(low + t, dtype=torch.int32).view(torch.float32)), cut)


_LANES_1 = 0x0001000100010001
_LANES_HIGH = 0x8000800080008000 - (1 << 64)  # as a signed int64


def _indices_equal(keys: torch.Tensor, value: int) -> torch.Tensor:
    """Ascending indices of `keys` (int16, values in [0, 0x7FFF]) equal to `value`.

    Scans 4 keys per int64 word with the "has a zero lane" bit trick on `keys ^ value`
    (no boolean tensor over all entries, no full-size temporaries), then checks the lanes
    of the few candidate words exactly.
    """
    n = keys.numel()
    device = keys.device
    if n < 4 or keys.data_ptr() % 8:
        return (keys == value).nonzero().squeeze(1)
    words = keys[: n - n % 4].view(torch.int64)
    pattern = value * _LANES_1
    chunk = chunk_elements(device)
    L = min(chunk, words.numel())
    x = _WS.get("swar.x", L, torch.int64, device)
    y = _WS.get("swar.y", L, torch.int64, device)
    found = []
    for s, e in _ranges(words.numel(), chunk):
        xx, yy = x[: e - s], y[: e - s]
        torch.bitwise_xor(words[s:e], pattern, out=xx)  # a lane is 0 where key == value
        torch.sub(xx, _LANES_1, out=yy)
        xx.bitwise_not_()
        yy.bitwise_and_(xx).bitwise_and_(_LANES_HIGH)  # non-zero iff some lane of xx is 0
        hits = yy.nonzero()
        if hits.numel():
            found.append(hits.squeeze(1) + s)
    parts = []
    if found:
        cand = torch.cat(found)
        lanes = keys[: n - n % 4].view(-1, 4)[cand]
        pos = (lanes == value).nonzero()
        parts.append(cand[pos[:, 0]] * 4 + pos[:, 1])
    if n % 4:
        tail = (keys[n - n % 4 :] == value).nonzero().squeeze(1) + (n - n % 4)
        parts.append(tail)
    if not parts:
        return torch.empty(0, dtype=torch.int64, device=device)
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _below(t: float) -> float:
    """The largest float32 below t (t >= 0): |x| > _below(t) <=> |x| >= t for float32 x."""
    if t <= 0:
        return -1.0
    return float(torch.nextafter(torch.tensor(t, dtype=torch.float32), torch.tensor(0.0)))


def _shrink_by_cut_(d: torch.Tensor, cut: MagnitudeCut, s: int, e: int) -> None:
    """Zero the entries [s, e) (held in `d`) that the cut drops, in place."""
    ge, gt = _below(cut.threshold), cut.threshold
    if e <= cut.cut:
        torch.hardshrink(d, ge, out=d)
    elif s >= cut.cut:
        torch.hardshrink(d, gt, out=d)
    else:
        m = cut.cut - s
        torch.hardshrink(d[:m], ge, out=d[:m])
        torch.hardshrink(d[m:], gt, out=d[m:])


# --------------------------------------------------------------------------- DARE masks

def dare_mask(shape: Sequence[int] | torch.Size, density: float, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The DARE keep mask (bool, `shape`) that the kernels use for this seed and density."""
    n = math.prod(shape)
    masker = DareMasker(seed, density, device)
    out = torch.empty(n, dtype=torch.bool, device=device)
    for s, e in _ranges(n, chunk_elements(device)):
        out[s:e] = masker.mask(s, e)
    return out.reshape(tuple(shape))


# --------------------------------------------------------------------------- task vectors


def task_vector_merge(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    specs: Sequence[TaskVectorSpec],
    *,
    sparsification: str | None,
    consensus: bool,
    normalize: bool,
    lam: float,
    rescale: bool,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """base + lam * combine_i(weight_i * sparsify(tensor_i - base)), written into `out`.

    sparsification: None, "magnitude" (TIES) or "random" (DARE, L1 rescale when `rescale`);
    consensus: TIES sign election (sign of the sum, >= 0 counts as +), keeping only agreeing
    entries, and with `normalize` division by the summed weights of those entries; without
    consensus `normalize` divides by sum(weights) (by 1 when that is ~0).
    """
    if sparsification not in (None, "magnitude", "random"):
        raise MergeError(f"unknown sparsification {sparsification!r}; use 'magnitude' or 'random'")
    if len(specs) != len(tensors):
        raise MergeError(f"got {len(tensors)} tensors but {len(specs)} specs")
    shape, device = _check_inputs(tensors, base)
    out = _output(out, shape, device, out_dtype)
    n = base.numel()
    flat_out = out.view(-1)
    if n == 0:
        return out
    if not tensors:
        flat_out.copy_(_flat(base))
        return out
    if triton_merge.usable(device, len(tensors)):
        triton_merge.task_vector_merge(_flat(base), [_flat(t) for t in tensors], specs, sparsification=sparsification,
                                       consensus=consensus, normalize=normalize, lam=float(lam), rescale=rescale,
                                       flat_out=flat_out)
        return out
    job = _TaskVectorJob(_flat(base), [_flat(t) for t in tensors], specs, device, n)
    job.lib = native.usable(device, [job.b, *job.ms], flat_out)
    live = list(range(len(tensors)))
    if sparsification == "magnitude":
        for i, sp in enumerate(specs):
            if magnitude_k(float(sp.density), n) == 0:
                live.remove(i)  # everything dropped: contributes nothing, agrees nowhere
        job.magnitude([i for i in live if magnitude_k(float(specs[i].density), n) < n], rescale)
    elif sparsification == "random":
        job.random(rescale)
    job.combine(live, consensus, normalize, float(lam), flat_out)
    return out


def divide_by_agreeing_(o: torch.Tensor, div: torch.Tensor, safe_div: bool) -> None:
    """o /= div in place, `div` holding the summed weights of the entries that agree with the
    elected sign. `safe_div` (every weight > 1e-20): `div` is 0 only where nothing agrees, and
    there `o` is 0 too; otherwise those zeros become 1."""
    if safe_div:
        div.clamp_min_(1e-30)
    else:
        div.masked_fill_(div == 0, 1.0)
    o.div_(div)


class _TaskVectorJob:
    """The passes of `task_vector_merge` over one tensor, chunk by chunk."""

    def __init__(self, base: torch.Tensor, ms: list[torch.Tensor], specs: Sequence[TaskVectorSpec], device: torch.device, n: int) -> None:
        self.b, self.ms, self.specs, self.device, self.n = base, ms, specs, device, n
        self.chunk = chunk_elements(device)
        self.ranges = _ranges(n, self.chunk)
        self.L = min(self.chunk, n)
        self.weights = [float(sp.weight) for sp in specs]
        self.scales = list(self.weights)
        self.cuts: dict[int, MagnitudeCut] = {}
        self.maskers: dict[int, DareMasker] = {}
        self.stored_masks: dict[int, torch.Tensor] = {}
        self.lib: native.Library | None = None  # the C kernels, when they can run this merge

    def buf(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return _WS.get(name, self.L, dtype, self.device)

    def delta(self, i: int, s: int, e: int, base_chunk: torch.Tensor) -> torch.Tensor:
        """model_i - base on entries [s, e) in float32 (a workspace buffer)."""
        d = self.buf(f"d{i}")[: e - s]
        d.copy_(self.ms[i][s:e])
        return d.sub_(base_chunk)

    def base_chunk(self, s: int, e: int) -> torch.Tensor:
        c = self.buf("base")[: e - s]
        return c.copy_(self.b[s:e])

    def chunks(self, fn: Callable[[int, int], Any]) -> list[Any]:
        """fn(s, e) for every chunk (in parallel inside `cpu_parallelism`); results in order."""
        results: list[Any] = [None] * len(self.ranges)

        def run(j: int) -> None:
            results[j] = fn(*self.ranges[j])

        _for_each(len(self.ranges), run, self.device)
        return results

    # ------------------------------------------------------------------ sparsification

    def magnitude(self, todo: list[int], rescale: bool) -> None:
        """TIES: the exact top-k cut of each model in `todo` (bf16 keys, then selection)."""
        if not todo:
            return
        if self.lib is not None and self._native_cuts(todo):
            self._magnitude_rescale(rescale)
            return
        keys = {i: _WS.get(f"keys{i}", self.n, torch.int16, self.device) for i in todo}

        def pass_a(s: int, e: int) -> None:
            c = self.base_chunk(s, e)
            for i in todo:
                keys[i][s:e].view(torch.bfloat16).copy_(self.delta(i, s, e, c))  # sign-symmetric rounding

        self.chunks(pass_a)
        b = self.b

        def select(j: int) -> None:
            i = todo[j]
            m_i = self.ms[i]

            def exact_abs(idx: torch.Tensor) -> torch.Tensor:
                return m_i.index_select(0, idx).float().sub_(b.index_select(0, idx).float()).abs_()

            k = magnitude_k(float(self.specs[i].density), self.n)
            self.cuts[i] = magnitude_cut(keys[i].bitwise_and_(0x7FFF), k, exact_abs)

        _for_each(len(todo), select, self.device)
        self._magnitude_rescale(rescale)

    def _native_cuts(self, todo: list[int]) -> bool:
        """The cuts of `todo` by the C kernels; False (nothing set) if a magnitude is inf/NaN."""
        assert self.lib is not None
        lib = self.lib.lib
        ks = [magnitude_k(float(self.specs[i].density), self.n) for i in todo]
        models = [self.ms[i] for i in todo]
        ptrs, codes = native.pointers(models)
        bcode = native.dtype_code(self.b)
        parts = _ranges(self.n, max(_HIST_PART, -(-self.n // _MAX_PARTS)))

        def hist(j: int) -> None:
            s, e = parts[j]
            lib.evomerge_ties_hist(self.b.data_ptr(), bcode, ptrs, codes, len(todo), s, e, hists[j].data_ptr())

        hists = torch.zeros(len(parts), len(todo), native.KEYS, dtype=torch.int32)
        _for_each(len(parts), hist, self.device)
        total = hists.sum(0, dtype=torch.int64)
        found = [bucket_of_kth(total[j], k) for j, k in enumerate(ks)]
        if any(bucket >= 0x7F80 for bucket, _ in found):
            return False  # inf/NaN among the top magnitudes: the torch path's exact handling

        fine = torch.zeros(len(parts), len(todo), native.FINE, dtype=torch.int32)

        def fine_hist(j: int) -> None:
            s, e = parts[j]
            for q, m in enumerate(models):
                lib.evomerge_ties_fine_hist(self.b.data_ptr(), bcode, m.data_ptr(), codes[q], s, e, found[q][0],
                                            fine[j, q].data_ptr())

        _for_each(len(parts), fine_hist, self.device)
        for q, i in enumerate(todo):
            bucket, rank = found[q]
            t, need = bucket_of_kth(fine[:, q].sum(0, dtype=torch.int64), rank)
            bits = (bucket << 16) - 0x8000 + t
            cut = self.n
            per_part = fine[:, q, t].to(torch.int64)
            if need < int(per_part.sum()):  # ties at the threshold: the need-th of them is the first dropped
                before = per_part.cumsum(0) - per_part
                p = int((before <= need).sum()) - 1  # the part that holds it
                s, e = parts[p]
                cut = int(lib.evomerge_nth_equal(self.b.data_ptr(), bcode, models[q].data_ptr(), codes[q], s, e, bits,
                                                 need - int(before[p])))
                if cut < 0:
                    raise MergeError(f"internal error: TIES tie {need} not found in entries {s}..{e}; set EVOMERGE_NATIVE=0 and report it")
            self.cuts[i] = MagnitudeCut(float(torch.tensor(bits, dtype=torch.int32).view(torch.float32)), cut)
        return True

    def _magnitude_rescale(self, rescale: bool) -> None:
        """With `rescale`, the L1 factors of the TIES models (off by default for TIES)."""
        if rescale:
            def sums(s: int, e: int) -> dict[int, tuple[float, float]]:
                c = self.base_chunk(s, e)
                a = self.buf("a")[: e - s]
                got = {}
                for i in self.cuts:
                    torch.abs(self.delta(i, s, e, c), out=a)
                    before = float(a.sum())
                    _shrink_by_cut_(a, self.cuts[i], s, e)
                    got[i] = (before, float(a.sum()))
                return got

            self._apply_rescale(self.chunks(sums), list(self.cuts))

    def random(self, rescale: bool) -> None:
        """DARE: the mask generators, and with `rescale` the L1 factors (uniforms stored)."""
        self.maskers = dare_maskers(self.specs, self.device)
        if not self.maskers or not rescale:
            return
        if self.lib is not None:
            self._apply_rescale(self._native_dare_sums(), list(self.maskers))
            return
        for i in self.maskers:  # -1 keep / 0 drop, exact in bf16, reused by the final pass
            self.stored_masks[i] = _WS.get(f"mask{i}", self.n, torch.bfloat16, self.device)

        def sums(s: int, e: int) -> dict[int, tuple[float, float]]:
            c = self.base_chunk(s, e)
            a, nm = self.buf("a")[: e - s], self.buf("nm")[: e - s]
            got = {}
            for i, mk in self.maskers.items():
                mk.neg_mask_into(mk.uniforms(s, e), nm)
                self.stored_masks[i][s:e].copy_(nm)
                torch.abs(self.delta(i, s, e, c), out=a)
                got[i] = (float(a.sum()), -float(torch.dot(a, nm)))
            return got

        self._apply_rescale(self.chunks(sums), list(self.maskers))

    def _native_dare_sums(self) -> list[dict[int, tuple[float, float]]]:
        """Per chunk {model: (sum |d|, sum of the kept |d|)} by the C kernels."""
        assert self.lib is not None
        order = list(self.maskers)
        ptrs, codes = native.pointers([self.ms[i] for i in order])
        muls, adds, thresholds = _masker_arrays([self.maskers[i] for i in order])
        bcode = native.dtype_code(self.b)

        def sums(s: int, e: int) -> dict[int, tuple[float, float]]:
            before = (ctypes.c_double * len(order))()
            after = (ctypes.c_double * len(order))()
            self.lib.lib.evomerge_dare_sums(self.b.data_ptr(), bcode, ptrs, codes, len(order), muls, adds, thresholds,
                                            s, e, before, after)
            return {i: (before[j], after[j]) for j, i in enumerate(order)}

        return self.chunks(sums)

    def _apply_rescale(self, per_chunk: list[dict[int, tuple[float, float]]], models: list[int]) -> None:
        for i in models:
            before = sum(r[i][0] for r in per_chunk)  # chunk order: independent of threads
            after = sum(r[i][1] for r in per_chunk)
            if before >= 1e-7 and after >= 1e-7:
                self.scales[i] *= before / after

    # ------------------------------------------------------------------ combine

    def combine(self, live: list[int], consensus: bool, normalize: bool, lam: float, flat_out: torch.Tensor) -> None:
        """The final pass: weighted (masked) task vectors, sign election, normalisation, + base."""
        wsum = sum(self.weights)
        plain_div = 1.0 if abs(wsum) < 1e-8 else wsum
        live_weights = [self.weights[i] for i in live]
        safe_div = bool(live_weights) and min(live_weights) > 1e-20  # divisor 0 <=> no agreeing entry
        if self.lib is not None:
            self._native_combine(live, consensus, normalize, safe_div, plain_div, lam, flat_out)
            return

        def chunk(s: int, e: int) -> None:
            L_ = e - s
            c = self.base_chunk(s, e)
            o = self.buf("acc")[:L_]
            wds = []
            for i in live:
                d = self.delta(i, s, e, c)
                scale = self.scales[i]
                if i in self.cuts:
                    _shrink_by_cut_(d, self.cuts[i], s, e)
                elif i in self.maskers:
                    nm = self.buf("nm")[:L_]
                    if i in self.stored_masks:
                        nm.copy_(self.stored_masks[i][s:e])
                    else:
                        self.maskers[i].neg_mask_into(self.maskers[i].uniforms(s, e), nm)
                    d.mul_(nm)
                    scale = -scale
                d.mul_(scale)
                wds.append((d, self.weights[i]))
            if not wds:
                o.zero_()
            elif consensus:
                g = self.buf("sgn")[:L_]
                ones = self.buf("ones")[:L_]
                ones.fill_(1.0)
                o.copy_(wds[0][0])
                for d, _ in wds[1:]:
                    o.add_(d)
                torch.copysign(ones, o, out=g)  # elected sign: -0.0 only when every entry is 0
                t = self.buf("a")[:L_]
                dv = self.buf("div")[:L_] if normalize else None
                for j, (d, w) in enumerate(wds):
                    d.mul_(g)
                    if j == 0:
                        torch.clamp_min(d, 0.0, out=o)
                        d = o
                    else:
                        d.clamp_min_(0.0)
                    if dv is not None:
                        torch.sign(d, out=t)  # 1 where the entry agrees with the elected sign
                        if j == 0:
                            torch.mul(t, w, out=dv)
                        else:
                            dv.add_(t, alpha=w)
                    if j > 0:
                        o.add_(d)
                if dv is not None:
                    divide_by_agreeing_(o, dv, safe_div)
                o.mul_(g)
            else:
                o.copy_(wds[0][0])
                for d, _ in wds[1:]:
                    o.add_(d)
                if normalize:
                    o.div_(plain_div)
            if lam != 1:
                o.mul_(lam)
            o.add_(c)
            flat_out[s:e].copy_(o)

        self.chunks(chunk)


    def _native_combine(self, live: list[int], consensus: bool, normalize: bool, safe_div: bool, plain_div: float,
                        lam: float, flat_out: torch.Tensor) -> None:
        """`combine` by the C kernels, chunk by chunk (the same arithmetic)."""
        assert self.lib is not None
        nm = len(live)
        ptrs, codes = native.pointers([self.ms[i] for i in live])
        kinds = (ctypes.c_int * max(1, nm))()
        ge, gt = (ctypes.c_float * max(1, nm))(), (ctypes.c_float * max(1, nm))()
        cuts = (ctypes.c_int64 * max(1, nm))()
        for j, i in enumerate(live):
            if i in self.cuts:
                kinds[j] = 1
                ge[j], gt[j], cuts[j] = _below(self.cuts[i].threshold), self.cuts[i].threshold, self.cuts[i].cut
            elif i in self.maskers:
                kinds[j] = 2
        muls, adds, thresholds = _masker_arrays([self.maskers.get(i) for i in live])
        scales = (ctypes.c_float * max(1, nm))(*[self.scales[i] for i in live])
        weights = (ctypes.c_float * max(1, nm))(*[self.weights[i] for i in live])
        bcode, ocode = native.dtype_code(self.b), native.dtype_code(flat_out)
        fn = self.lib.lib.evomerge_tv_combine

        def chunk(s: int, e: int) -> None:
            fn(self.b.data_ptr(), bcode, ptrs, codes, nm, kinds, scales, weights, ge, gt, cuts, muls, adds, thresholds,
               int(consensus), int(normalize), int(safe_div), plain_div, int(lam != 1), lam, s, e, flat_out.data_ptr(), ocode)

        self.chunks(chunk)


_HIST_PART = 1 << 21  # entries per C histogram call (each part has its own histograms) ...
_MAX_PARTS = 64  # ... and at most this many parts per tensor (bounds the histograms' memory)


def _masker_arrays(maskers: Sequence[DareMasker | None]) -> tuple[ctypes.Array, ctypes.Array, ctypes.Array]:
    """The (mul, add, threshold) arrays of DARE maskers for the C kernels (zeros for None)."""
    n = max(1, len(maskers))
    muls, adds, thresholds = (ctypes.c_uint32 * n)(), (ctypes.c_uint32 * n)(), (ctypes.c_int32 * n)()
    for j, mk in enumerate(maskers):
        if mk is not None:
            muls[j], adds[j], thresholds[j] = mk.mul & 0xFFFFFFFF, mk.add & 0xFFFFFFFF, mk.threshold
    return muls, adds, thresholds


# --------------------------------------------------------------------------- linear, slerp


def linear_merge(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    normalize: bool,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """sum_i weight_i * tensor_i [/ sum_i weight_i when `normalize`], into `out`."""
    shape, device = _check_inputs(tensors, None)
    out = _output(out, shape, device, out_dtype)
    total = float(sum(weights))
    if normalize and total == 0:
        raise MergeError("linear merge with normalize: true needs weights that do not sum to 0; change the weights or set normalize: false")
    n = out.numel()
    chunk = chunk_elements(device)
    L = min(chunk, n)
    flat = [_flat(t) for t in tensors]
    flat_out = out.view(-1)
    if n and triton_merge.usable(device, len(flat)):
        triton_merge.linear_merge(flat_out, flat, weights, normalize=normalize, total=total)
        return out
    ranges = _ranges(n, chunk)

    def run(j: int) -> None:
        s, e = ranges[j]
        o = _WS.get("acc", L, torch.float32, device)[: e - s]
        x = _WS.get("d0", L, torch.float32, device)[: e - s]
        for k, (t, w) in enumerate(zip(flat, weights)):
            if k == 0:
                o.copy_(t[s:e])
                o.mul_(float(w))
            else:
                x.copy_(t[s:e])
                o.add_(x, alpha=float(w))
        if normalize:
            o.div_(total)
        flat_out[s:e].copy_(o)

    _for_each(len(ranges), run, device)
    return out


def slerp_coefficients(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8) -> tuple[float, float]:
    """(c0, c1) with slerp(t, v0, v1) = c0 * v0 + c1 * v1 (angle of the normalised tensors,
    in float64; nearly (anti)parallel inputs, |cos| > dot_threshold, interpolate linearly)."""
    a, b = _flat(v0), _flat(v1)
    n = a.numel()
    device = a.device
    chunk = chunk_elements(device)
    L = min(chunk, n) if n else 1
    ranges = _ranges(n, chunk)
    parts: list[tuple[float, float, float]] = [(0.0, 0.0, 0.0)] * len(ranges)

    def run(j: int) -> None:
        s, e = ranges[j]
        xx = _WS.get("s0", L, torch.float64, device)[: e - s]
        yy = _WS.get("s1", L, torch.float64, device)[: e - s]
        xx.copy_(a[s:e])
        yy.copy_(b[s:e])
        parts[j] = (float(torch.dot(xx, yy)), float(torch.dot(xx, xx)), float(torch.dot(yy, yy)))

    _for_each(len(ranges), run, device)
    dot, aa, bb = (sum(p[k] for p in parts) for k in range(3))
    return slerp_coefficients_from_dots(t, dot, aa, bb, n, dot_threshold, eps)


def slerp_coefficients_from_dots(t: float, dot: float, aa: float, bb: float, n: int, dot_threshold: float = 0.9995,
                                 eps: float = 1e-8) -> tuple[float, float]:
    """(c0, c1) of slerp from <v0, v1>, |v0|^2, |v1|^2 and the element count `n`."""
    na, nb = math.sqrt(aa), math.sqrt(bb)
    na = na if na > eps else 1.0
    nb = nb if nb > eps else 1.0
    cos = max(-1.0, min(1.0, dot / (na * nb))) if n else 1.0
    if abs(cos) > dot_threshold:
        return 1.0 - t, t
    theta = math.acos(cos)
    sin_theta = math.sin(theta)
    return math.sin((1.0 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta


def scaled_sum(
    v0: torch.Tensor,
    c0: float,
    v1: torch.Tensor,
    c1: float,
    *,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """v0 * c0 + v1 * c1 in float32 (each product rounded, then the sum), into `out`."""
    shape, device = _check_inputs([v1], v0)
    out = _output(out, shape, device, out_dtype)
    n = out.numel()
    chunk = chunk_elements(device)
    L = min(chunk, n)
    a, b, flat_out = _flat(v0), _flat(v1), out.view(-1)
    ranges = _ranges(n, chunk)

    def run(j: int) -> None:
        s, e = ranges[j]
        o = _WS.get("acc", L, torch.float32, device)[: e - s]
        xx = _WS.get("d0", L, torch.float32, device)[: e - s]
        o.copy_(a[s:e])
        o.mul_(float(c0))
        xx.copy_(b[s:e])
        xx.mul_(float(c1))
        o.add_(xx)
        flat_out[s:e].copy_(o)

    _for_each(len(ranges), run, device)
    return out


def slerp_merge(
    t: float,
    v0: torch.Tensor,
    v1: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Spherical interpolation of two whole tensors at position t, into `out`."""
    c0, c1 = slerp_coefficients(float(t), v0, v1)
    return scaled_sum(v0, c0, v1, c1, out=out, out_dtype=out_dtype)
