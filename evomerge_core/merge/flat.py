"""Whole-model merging over precomputed flat sources, for resident models that are small.

A worker that evaluates thousands of candidates of one run merges the same sources again and
again. For a small model the per-tensor kernels spend their time in Python and op dispatch
(a few hundred tensor ops per tensor), not in arithmetic. `FlatSources` therefore keeps, once
per worker, every source as one float32 vector (all tensors concatenated in model order) and
caches what does not depend on the genome: the task vectors (model - base), their per-tensor
L1 norms, the DARE uniforms of each (seed, model position) and the TIES magnitude ranks. A
candidate is then a few dozen whole-model ops plus short per-tensor loops for the values that
differ per tensor (weights, densities, rescale factors).

Semantics are those of `evomerge_core.merge.kernels` (same DARE masks, same exact top-k with
lowest-index ties); TIES and the task-arithmetic family give bit-identical results, DARE's
L1 rescale factors can differ in the last float32 bit (summation order).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from evomerge_core.errors import MergeError
from evomerge_core.merge import kernels
from evomerge_core.merge.params import MergePlan, resolve_tensor_params
from evomerge_core.merge.methods import METHODS
from evomerge_core.merge.sparsify import Consensus, DareMasker, Sparsification, tensor_seed

# Methods merged here (linear, slerp and the task-vector family's declarations); anything
# else goes through the per-tensor engine.
FLAT_METHODS = frozenset({"linear", "slerp", *(name for name, m in METHODS.items() if m.task_vector is not None)})


class FlatSources:
    """Source models as flat float32 vectors over the same tensor layout, plus caches."""

    def __init__(self, state_dicts: Mapping[str, Mapping[str, torch.Tensor]], names: Sequence[str],
                 device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        first = next(iter(state_dicts.values()))
        # Tensors of equal size sit next to each other, so a per-tensor value (a weight, a
        # rescale factor) is applied to a whole group as a (count, size) view in one op.
        order = sorted(range(len(names)), key=lambda i: (-math.prod(first[names[i]].shape), i))
        self.names = [names[i] for i in order]
        self.shapes = [tuple(first[n].shape) for n in self.names]
        self.numels = [math.prod(s) for s in self.shapes]
        self.offsets = [0]
        for k in self.numels:
            self.offsets.append(self.offsets[-1] + k)
        self.numel = self.offsets[-1]
        self.groups: list[tuple[int, int, int, int]] = []  # (first tensor, count, start, size)
        for t, size in enumerate(self.numels):
            if self.groups and self.groups[-1][3] == size:
                g = self.groups[-1]
                self.groups[-1] = (g[0], g[1] + 1, g[2], size)
            else:
                self.groups.append((t, 1, self.offsets[t], size))
        self.flat: dict[str, torch.Tensor] = {}
        for ref, sd in state_dicts.items():
            vec = torch.empty(self.numel, dtype=torch.float32, device=self.device)
            for name, shape, (s, e) in zip(self.names, self.shapes, self.segments()):
                t = sd[name]
                if tuple(t.shape) != shape:
                    raise MergeError(f"tensor {name} has shape {list(t.shape)} in {ref!r} but {list(shape)} elsewhere")
                vec[s:e].copy_(t.reshape(-1))
            self.flat[ref] = vec
        self._cache: dict[tuple[Any, ...], Any] = {}

    def segments(self) -> list[tuple[int, int]]:
        """(start, end) of each tensor in the flat vectors."""
        return list(zip(self.offsets[:-1], self.offsets[1:]))

    def views(self, ref: str) -> dict[str, torch.Tensor]:
        """Source `ref` as a state dict of views into its flat vector."""
        return {n: self.flat[ref][s:e].view(shape) for n, shape, (s, e) in zip(self.names, self.shapes, self.segments())}

    # ------------------------------------------------------------------ cached pieces

    def delta(self, base: str, model: str) -> torch.Tensor:
        """model - base (float32), computed once."""
        key = ("delta", base, model)
        if key not in self._cache:
            self._cache[key] = self.flat[model] - self.flat[base]
        return self._cache[key]

    def l1(self, base: str, model: str) -> list[float]:
        """Per-tensor L1 norm of the task vector (summed per kernel chunk, like the kernels)."""
        key = ("l1", base, model)
        if key not in self._cache:
            self._cache[key] = segment_sums(self, self.delta(base, model).abs())
        return self._cache[key]

    def uniforms(self, seed: int, position: int) -> torch.Tensor:
        """DARE uniforms of model position `position` for recipe seed `seed`, as float32
        (exact int16 values, so the keep test is arithmetic)."""
        key = ("uniforms", seed, position)
        if key not in self._cache:
            out = torch.empty(self.numel, dtype=torch.float32, device=self.device)
            for name, (s, e) in zip(self.names, self.segments()):
                masker = DareMasker(tensor_seed(seed, name, position), 0.5, self.device)
                for cs, ce in kernels._ranges(e - s, kernels.chunk_elements(self.device)):
                    out[s + cs : s + ce].copy_(masker.uniforms(cs, ce))
            self._cache[key] = out
        return self._cache[key]

    def ones(self) -> torch.Tensor:
        """A flat vector of ones (float32)."""
        key = ("ones",)
        if key not in self._cache:
            self._cache[key] = torch.ones(self.numel, dtype=torch.float32, device=self.device)
        return self._cache[key]

    def ranks(self, base: str, model: str) -> torch.Tensor:
        """Rank of each entry's |model - base| within its tensor (0 = largest; equal
        magnitudes ranked by index), computed once by a stable sort per tensor."""
        key = ("ranks", base, model)
        if key not in self._cache:
            d = self.delta(base, model)
            out = torch.empty(self.numel, dtype=torch.float32, device=self.device)  # exact below 2^24
            for s, e in self.segments():
                order = torch.sort(d[s:e].abs(), descending=True, stable=True).indices
                out[s:e][order] = torch.arange(e - s, dtype=torch.float32, device=self.device)
            self._cache[key] = out
        return self._cache[key]


def segment_sums(fs: FlatSources, a: torch.Tensor) -> list[float]:
    """Per-tensor sums of the flat vector `a` (float32, one op per group of equal-size tensors)."""
    sums: list[float] = []
    for _, count, start, size in fs.groups:
        sums.extend(a[start : start + count * size].view(count, size).sum(1).tolist())
    return sums


def per_tensor_(fs: FlatSources, x: torch.Tensor, values: list[float], op: str) -> None:
    """x[tensor t] (op)= values[t] in place, op "mul", "div" or "sub"; one op per group
    (one op overall when every tensor has the same value)."""
    identity = 0.0 if op == "sub" else 1.0
    same = _per_tensor(values)
    if same is not None:
        if same != identity:
            getattr(x, op + "_")(same)
        return
    for first, count, start, size in fs.groups:
        vals = values[first : first + count]
        part = x[start : start + count * size]
        if all(v == vals[0] for v in vals):
            if vals[0] != identity:
                getattr(part, op + "_")(vals[0])
        else:
            col = torch.tensor(vals, dtype=x.dtype, device=x.device).view(count, 1)
            getattr(part.view(count, size), op + "_")(col)


def all_finite(x: torch.Tensor) -> bool:
    """True when every entry is finite (a sum first: it is finite when all entries are, unless
    it overflows, in which case the entries are checked one by one)."""
    if bool(torch.isfinite(x.sum())):
        return True
    return bool(torch.isfinite(x).all())


def _per_tensor(values: list[float]) -> float | None:
    """The common value when every tensor has the same one, else None."""
    first = values[0]
    return first if all(v == first for v in values) else None


def merge_flat(fs: FlatSources, plan: MergePlan, num_layers: int, out: torch.Tensor) -> torch.Tensor:
    """Merge `plan` over all tensors of `fs` into the flat float32 vector `out`."""
    method = plan.method.name
    if method not in FLAT_METHODS:
        raise MergeError(f"merge method {method} is not supported by the flat merger")
    resolved = [resolve_tensor_params(plan, name, num_layers) for name in fs.names]
    glob = [g for g, _ in resolved]
    per_model = [[mp[i] for _, mp in resolved] for i in range(len(plan.inputs))]
    if method == "linear":
        return _linear(fs, plan, glob, per_model, out)
    if method == "slerp":
        return _slerp(fs, plan, glob, out)
    return _task_vector(fs, plan, glob, per_model, out)


def _linear(fs, plan, glob, per_model, out) -> torch.Tensor:
    weights = [[float(mp["weight"]) for mp in pm] for pm in per_model]
    tmp = None
    for j, ref in enumerate(plan.inputs):
        if j == 0:
            out.copy_(fs.flat[ref])
            per_tensor_(fs, out, weights[0], "mul")
            continue
        same = _per_tensor(weights[j])
        if same is not None:
            out.add_(fs.flat[ref], alpha=same)  # the kernels' rounding (fused multiply-add)
        else:
            tmp = torch.empty_like(out) if tmp is None else tmp
            tmp.copy_(fs.flat[ref])
            per_tensor_(fs, tmp, weights[j], "mul")
            out.add_(tmp)
    totals = [sum(w[t] for w in weights) for t in range(len(fs.names))]
    normalize = [bool(g["normalize"]) for g in glob]
    if any(n and total == 0 for n, total in zip(normalize, totals)):
        raise MergeError("linear merge with normalize: true needs weights that do not sum to 0; change the weights or set normalize: false")
    per_tensor_(fs, out, [total if n else 1.0 for n, total in zip(normalize, totals)], "div")
    return out


def _slerp(fs, plan, glob, out) -> torch.Tensor:
    v0, v1 = fs.flat[plan.base], fs.flat[plan.inputs[0]]
    a, b = v0.double(), v1.double()
    c0s, c1s = [], []
    for t, (s, e) in enumerate(fs.segments()):
        aa, bb = a[s:e], b[s:e]
        dot, na2, nb2 = float(torch.dot(aa, bb)), float(torch.dot(aa, aa)), float(torch.dot(bb, bb))
        c0, c1 = kernels.slerp_coefficients_from_dots(float(glob[t]["t"]), dot, na2, nb2, e - s)
        c0s.append(c0)
        c1s.append(c1)
    out.copy_(v0)
    per_tensor_(fs, out, c0s, "mul")
    tmp = v1.clone()
    per_tensor_(fs, tmp, c1s, "mul")
    return out.add_(tmp)


def _task_vector(fs, plan, glob, per_model, out) -> torch.Tensor:
    variant = plan.method.task_vector
    assert variant is not None  # merge_flat sends only the task-vector family here
    sparsification = variant.sparsification
    consensus = variant.consensus is Consensus.SIGN
    T = len(fs.names)
    sizes = fs.numels
    normalize = _per_tensor([float(bool(g["normalize"])) for g in glob])
    if normalize is None:
        raise MergeError("normalize varies across tensors; the flat merger does not support that")
    rescale = [bool(g.get("rescale", False)) for g in glob]
    weights = [[float(mp["weight"]) for mp in pm] for pm in per_model]
    densities = [[float(mp.get("density", 1.0)) for mp in pm] for pm in per_model]
    wds: list[torch.Tensor] = []
    live_weights: list[list[float]] = []
    for i, ref in enumerate(plan.inputs):
        d = fs.delta(plan.base, ref).clone()
        scales = list(weights[i])
        if sparsification is Sparsification.MAGNITUDE and any(x < 1 for x in densities[i]):
            ks = [kernels.magnitude_k(densities[i][t], sizes[t]) for t in range(T)]
            if all(k == 0 for k in ks):
                continue  # dropped entirely: contributes nothing, agrees nowhere
            keep = fs.ranks(plan.base, ref).clone()  # keep rank < k: clamp(k - rank, 0, 1) is 1 or 0
            per_tensor_(fs, keep, [float(k) for k in ks], "sub")
            d.mul_(keep.neg_().clamp_(0.0, 1.0))
            if any(rescale):
                _rescale(fs, plan.base, ref, d, scales, [r and k < n for r, k, n in zip(rescale, ks, sizes)])
        elif sparsification is Sparsification.RANDOM and any(x < 1 for x in densities[i]):
            levels = [min(65536, max(0, round(x * 65536))) for x in densities[i]]
            neg_keep = fs.uniforms(plan.recipe.seed, i).clone()  # -> -1 keep, 0 drop (as DareMasker)
            per_tensor_(fs, neg_keep, [float(v - 32768) for v in levels], "sub")
            d.mul_(neg_keep.clamp_(-1.0, 0.0))
            scales = [-w for w in scales]
            if any(rescale):
                _rescale(fs, plan.base, ref, d, scales, [r and v < 65536 for r, v in zip(rescale, levels)])
        per_tensor_(fs, d, scales, "mul")
        wds.append(d)
        live_weights.append(weights[i])
    if not wds:
        out.zero_()
    elif consensus:
        out.copy_(wds[0])
        for d in wds[1:]:
            out.add_(d)
        g = torch.copysign(fs.ones(), out)  # elected sign: -0.0 only when every entry is 0
        div = torch.empty_like(out) if normalize else None
        agree = torch.empty_like(out) if normalize and len(wds) > 1 else None
        for j, (d, ws) in enumerate(zip(wds, live_weights)):
            d.mul_(g)
            d.clamp_min_(0.0)
            if div is not None:
                target = div if j == 0 else agree
                torch.sign(d, out=target)  # 1 where the entry agrees with the elected sign
                per_tensor_(fs, target, ws, "mul")
                if j > 0:
                    div.add_(agree)
            if j == 0:
                out.copy_(d)
            else:
                out.add_(d)
        if div is not None:
            kernels.divide_by_agreeing_(out, div, min(min(ws) for ws in live_weights) > 1e-20)
        out.mul_(g)
    else:
        out.copy_(wds[0])
        for d in wds[1:]:
            out.add_(d)
        if normalize:
            wsums = [sum(weights[i][t] for i in range(len(weights))) for t in range(T)]
            per_tensor_(fs, out, [1.0 if abs(w) < 1e-8 else w for w in wsums], "div")
    per_tensor_(fs, out, [float(g["lambda"]) for g in glob], "mul")
    return out.add_(fs.flat[plan.base])


def _rescale(fs, base, ref, masked, scales, todo) -> None:
    """scales[t] *= ||delta_t||_1 / ||masked delta_t||_1 for the tensors in `todo` (mergekit's
    rule; both norms at least 1e-7)."""
    before = fs.l1(base, ref)
    after = segment_sums(fs, masked.abs())
    for t, on in enumerate(todo):
        if on and before[t] >= 1e-7 and after[t] >= 1e-7:
            scales[t] *= before[t] / after[t]
