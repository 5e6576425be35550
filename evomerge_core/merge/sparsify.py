"""What the task-vector family's sparsification and consensus mean, and the pieces every fast
path shares (torch kernels, C kernels, Triton kernels, the flat merger).

- `Sparsification`: how each task vector (model - base) is thinned: not at all, by magnitude
  (TIES trim: `MagnitudeCut` keeps exactly `magnitude_k` entries) or at random (DARE:
  `DareMasker`, a counter hash so masks agree across chunking, threads and devices).
- `Consensus`: how the thinned task vectors are combined: summed, or by TIES sign election.
- `TaskVectorSpec`: one non-base input (weight, density, DARE seed); `tensor_seed` and
  `seed_from` give the seeds.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from enum import Enum
from typing import Sequence

import torch

from evomerge_core.errors import MergeError
from evomerge_core.merge.workspace import WS


class Sparsification(str, Enum):
    """How a task vector is thinned before it is combined (mergekit's `sparsification_method`)."""

    NONE = "none"  # every entry kept
    MAGNITUDE = "magnitude"  # TIES trim: the top-`density` share of |delta|, ties lowest index first
    RANDOM = "random"  # DARE: each entry kept with probability `density`

    @property
    def kernel_name(self) -> str | None:
        """The kernels' `sparsification` argument: None, "magnitude" or "random"."""
        return None if self is Sparsification.NONE else self.value


class Consensus(str, Enum):
    """How the thinned task vectors are combined (mergekit's `consensus_method`)."""

    NONE = "none"  # weighted sum
    SIGN = "sign"  # TIES: elect each entry's sign by the weighted sum, keep only agreeing entries


@dataclass(frozen=True)
class TaskVectorSpec:
    """One non-base input of a task-vector merge."""

    weight: float
    density: float = 1.0
    seed: int | None = None  # DARE only


@dataclass(frozen=True)
class MagnitudeCut:
    """Keep entry j iff |d_j| > threshold, or |d_j| == threshold and j < cut.

    Built so that exactly k entries are kept (ties at the threshold lowest index first).
    """

    threshold: float
    cut: int


def magnitude_k(density: float, n: int) -> int:
    """Entries TIES keeps of n: max(1, int(density * n)); all if density >= 1, none if <= 0."""
    if density >= 1:
        return n
    if density <= 0 or n == 0:
        return 0
    return min(n, max(1, int(density * n)))


# --------------------------------------------------------------------------- DARE masks

_HASH_MUL = 0x45D9F3B


def _i32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


class DareMasker:
    """Bernoulli(density) keep masks from a counter hash.

    Entry j of a tensor uses the 16-bit half j % 2 of h(j // 2), where h is a 32-bit mixer
    (xorshift-multiply, two rounds) applied to mul * (j // 2) + add, with (mul, add) taken
    from the 64-bit seed. The entry is kept iff that half, as a signed int16, is below
    round(density * 65536) - 32768.
    """

    def __init__(self, seed: int, density: float, device: torch.device | str) -> None:
        seed = int(seed) & ((1 << 64) - 1)
        self.mul = _i32((seed >> 32) | 1)
        self.add = _i32(seed)
        level = min(65536, max(0, round(float(density) * 65536)))
        self.keep_all = level >= 65536
        self.threshold = level - 32768
        self.device = torch.device(device)

    def uniforms(self, s: int, e: int, scratch: str = "dare") -> torch.Tensor:
        """Uniform int16 values of entries [s, e) (s even), in a workspace buffer."""
        nw = (e - s + 1) // 2
        words = WS.get(scratch + ".w", nw, torch.int32, self.device)
        tmp = WS.get(scratch + ".t", nw, torch.int32, self.device)
        torch.mul(_arange(nw, self.device), self.mul, out=words)
        words.add_(_i32(self.mul * (s // 2) + self.add))
        for _ in range(2):
            _xorshift16_(words, tmp)
            words.mul_(_HASH_MUL)
        _xorshift16_(words, tmp)
        return words.view(torch.int16)[: e - s]

    def mask(self, s: int, e: int) -> torch.Tensor:
        """Boolean keep mask of entries [s, e)."""
        if self.keep_all:
            return torch.ones(e - s, dtype=torch.bool, device=self.device)
        return self.uniforms(s, e) < self.threshold

    def neg_mask_into(self, u: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """-1.0 where the uniforms `u` keep the entry, 0.0 where they drop it (float32 `out`)."""
        out.copy_(u)
        out.sub_(self.threshold)
        return out.clamp_(-1.0, 0.0)


_MIN_ARANGE = 1 << 18  # grow the shared buffer at least this far (fewer reallocations)
_ARANGES: dict[str, torch.Tensor] = {}
_ARANGES_LOCK = threading.Lock()


def _arange(n: int, device: torch.device) -> torch.Tensor:
    """0 .. n-1 as int32 (a shared, grow-only buffer per device; read-only)."""
    key = str(device)
    ar = _ARANGES.get(key)
    if ar is None or ar.numel() < n:
        with _ARANGES_LOCK:
            ar = _ARANGES.get(key)
            if ar is None or ar.numel() < n:
                ar = torch.arange(max(n, _MIN_ARANGE), dtype=torch.int32, device=device)
                _ARANGES[key] = ar
    return ar[:n]


def _xorshift16_(words: torch.Tensor, tmp: torch.Tensor) -> None:
    """words ^= words >>> 16 (logical shift on int32)."""
    torch.bitwise_right_shift(words, 16, out=tmp)
    tmp.bitwise_and_(0xFFFF)
    words.bitwise_xor_(tmp)


def dare_maskers(specs: Sequence[TaskVectorSpec], device: torch.device) -> dict[int, DareMasker]:
    """{model position: its DARE masker} for the models that drop anything (density < 1)."""
    maskers = {}
    for i, sp in enumerate(specs):
        if float(sp.density) >= 1:
            continue
        if sp.seed is None:
            raise MergeError("DARE needs a seed per model; pass TaskVectorSpec(seed=...)")
        mk = DareMasker(sp.seed, float(sp.density), device)
        if not mk.keep_all:
            maskers[i] = mk
    return maskers


def seed_from(generator: torch.Generator | int | None) -> int:
    """A 63-bit DARE seed: the int itself, one draw from `generator`, or from torch's RNG."""
    if isinstance(generator, int):
        return generator
    return int(torch.randint(0, 2**63 - 1, (1,), generator=generator, device=generator.device if generator is not None else "cpu"))


def tensor_seed(seed: int, tensor_name: str, model_index: int) -> int:
    """The DARE seed of one (tensor, model) pair: independent of the order tensors are merged."""
    digest = hashlib.blake2b(f"{seed}\x00{tensor_name}\x00{model_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
