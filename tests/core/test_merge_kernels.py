"""The chunked merge kernels against straightforward float32 reference code.

The reference functions below are the plain, whole-tensor formulation of each method (the
code the kernels replaced); TIES must match them bit for bit (up to the sign of zero),
including ties at the threshold, chunk boundaries and bf16 inputs. Every test runs twice: on
the C kernels (`native`, the default on CPU) and on the torch ops (`EVOMERGE_NATIVE=0`, what
runs where no C compiler is found).
"""

from __future__ import annotations

import math

import pytest
import torch

from evomerge_core.merge import kernels, native
from evomerge_core.merge.kernels import TaskVectorSpec, task_vector_merge

torch.set_num_threads(1)


@pytest.fixture(autouse=True, params=["native", "torch"])
def kernel_path(request, monkeypatch):
    """Run the test on the C kernels and on the torch ops."""
    if request.param == "native":
        monkeypatch.delenv("EVOMERGE_NATIVE", raising=False)
        if native.library() is None:
            pytest.skip("the C kernels are unavailable (no C compiler); test_native_kernels.py checks they build")
    else:
        monkeypatch.setenv("EVOMERGE_NATIVE", "0")
    return request.param


# --------------------------------------------------------------------------- references


def ref_magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Top-k |delta| by a full stable sort; ties at the threshold lowest index first."""
    n = delta.numel()
    k = kernels.magnitude_k(density, n)
    order = torch.sort(delta.abs().reshape(-1), descending=True, stable=True).indices
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[:k]] = True
    return mask.reshape(delta.shape)


def ref_task_vector(base, tensors, specs, *, sparsification, consensus, normalize, lam, rescale, masks=None):
    base = base.float()
    weighted, weights = [], []
    for i, (t, sp) in enumerate(zip(tensors, specs)):
        delta = t.float() - base
        if sp.density < 1:
            if sparsification == "magnitude":
                mask = ref_magnitude_mask(delta, sp.density)
            elif sparsification == "random":
                mask = masks[i]
            else:
                mask = torch.ones_like(delta, dtype=torch.bool)
            before = delta.abs().sum(dtype=torch.float64)
            delta = delta * mask
            after = delta.abs().sum(dtype=torch.float64)
            if rescale and before >= 1e-7 and after >= 1e-7:
                delta = delta * float(before / after)
        weighted.append(delta * sp.weight)
        weights.append(sp.weight)
    mixed = weighted[0].clone()
    for d in weighted[1:]:
        mixed += d
    if consensus:
        positive = mixed >= 0
        mixed = torch.zeros_like(base)
        divisor = torch.zeros_like(base)
        for d, w in zip(weighted, weights):
            keep = torch.where(positive, d > 0, d < 0)
            mixed += d * keep
            divisor += keep * w
        divisor[divisor == 0] = 1.0
    else:
        wsum = sum(weights)
        divisor = torch.tensor(1.0 if abs(wsum) < 1e-8 else wsum)
    if normalize:
        mixed = mixed / divisor
    if lam != 1:
        mixed = mixed * lam
    return mixed + base


def _family(shape, *, dtype=torch.float32, seed=0, models=2, noise=0.01):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g) * 0.02
    tensors = [(base + noise * torch.randn(shape, generator=g)).to(dtype) for _ in range(models)]
    return base.to(dtype), tensors


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 64 elements (C histogram parts of 96) so every test crosses many boundaries."""
    monkeypatch.setattr(kernels, "CPU_CHUNK", 64)
    monkeypatch.setattr(kernels, "_HIST_PART", 96)


# --------------------------------------------------------------------------- TIES


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize(
    "dtype,shape,densities,weights,normalize,lam",
    [
        (torch.float32, (37, 29), (0.5, 0.3), (0.7, 0.6), True, 1.0),
        (torch.bfloat16, (64, 33), (0.5, 0.5), (0.5, 0.5), True, 1.0),  # many exact ties
        (torch.bfloat16, (1001,), (0.9, 0.01), (1.0, 0.2), False, 1.3),
        (torch.float16, (8, 8, 7), (1e-9, 0.999), (0.4, 0.9), True, 0.8),  # k = 1 and k = n - 1
        (torch.float32, (300,), (0.0, 0.6), (0.5, 0.5), True, 1.0),  # one model dropped entirely
        (torch.float32, (300,), (1.0, 0.2), (-0.3, 0.8), True, 1.0),  # a negative weight
    ],
)
def test_ties_matches_reference_bit_for_bit(request, chunked, dtype, shape, densities, weights, normalize, lam):
    if chunked:
        request.getfixturevalue("small_chunks")
    base, tensors = _family(shape, dtype=dtype, models=len(densities))
    specs = [TaskVectorSpec(w, d) for w, d in zip(weights, densities)]
    got = task_vector_merge(base, tensors, specs, sparsification="magnitude", consensus=True, normalize=normalize, lam=lam, rescale=False)
    want = ref_task_vector(base, tensors, specs, sparsification="magnitude", consensus=True, normalize=normalize, lam=lam, rescale=False)
    assert got.dtype == torch.float32 and got.shape == torch.Size(shape)
    assert torch.equal(got, want), float((got - want).abs().max())
    assert not torch.equal(got, base.float())


def test_ties_with_rescale_matches_reference(small_chunks):
    base, tensors = _family((500,), dtype=torch.bfloat16)
    specs = [TaskVectorSpec(0.7, 0.4), TaskVectorSpec(0.5, 0.6)]
    kw = dict(sparsification="magnitude", consensus=True, normalize=True, lam=1.0, rescale=True)
    got = task_vector_merge(base, tensors, specs, **kw)
    want = ref_task_vector(base, tensors, specs, **kw)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-7)


def test_exact_sign_cancellation_elects_plus_like_the_reference():
    # w1*d1 == -w2*d2 exactly: the sum is +0.0, which counts as +, so the positive entry wins
    base = torch.zeros(4)
    a = torch.tensor([1.0, -1.0, 0.5, 0.0])
    b = torch.tensor([-1.0, 1.0, -0.5, 0.0])
    specs = [TaskVectorSpec(0.5), TaskVectorSpec(0.5)]
    got = task_vector_merge(base, [a, b], specs, sparsification=None, consensus=True, normalize=True, lam=1.0, rescale=False)
    assert torch.equal(got, torch.tensor([1.0, 1.0, 0.5, 0.0]))


def test_output_dtype_is_the_rounded_float32_result():
    base, tensors = _family((40, 50), dtype=torch.bfloat16)
    specs = [TaskVectorSpec(0.6, 0.5), TaskVectorSpec(0.7, 0.5)]
    kw = dict(sparsification="magnitude", consensus=True, normalize=True, lam=1.0, rescale=False)
    out = torch.empty((40, 50), dtype=torch.bfloat16)
    assert task_vector_merge(base, tensors, specs, out=out, **kw) is out
    assert torch.equal(out, task_vector_merge(base, tensors, specs, **kw).to(torch.bfloat16))


@pytest.mark.parametrize("n", [1, 2, 5, 1000, 4099])
def test_magnitude_cut_keeps_exactly_k_lowest_index_ties(n):
    g = torch.Generator().manual_seed(n)
    delta = torch.randint(-3, 4, (n,), generator=g).float() * 0.25  # a handful of values: many ties
    keys = delta.to(torch.bfloat16).view(torch.int16).bitwise_and(0x7FFF)
    for density in (1e-9, 0.1, 0.5, 0.77, 0.999):
        k = kernels.magnitude_k(density, n)
        cut = kernels.magnitude_cut(keys, k, lambda idx: delta[idx].abs())
        mags = delta.abs()
        mask = (mags > cut.threshold) | ((mags == cut.threshold) & (torch.arange(n) < cut.cut))
        assert int(mask.sum()) == k
        assert torch.equal(mask, ref_magnitude_mask(delta, density))


def test_indices_equal_matches_nonzero():
    g = torch.Generator().manual_seed(0)
    for n in (1, 3, 4, 5, 17, 1000, 300001):
        keys = torch.randint(0, 40, (n,), generator=g, dtype=torch.int16)
        for value in (0, 5, 39, 100):
            assert torch.equal(kernels._indices_equal(keys, value), (keys == value).nonzero().squeeze(1))
    keys = torch.randint(0, 0x8000, (100_001,), generator=g).to(torch.int16)
    for value in (0x7FFF, 0, 1, 0x4000):
        assert torch.equal(kernels._indices_equal(keys[1:], value), (keys[1:] == value).nonzero().squeeze(1))


# --------------------------------------------------------------------------- DARE


def test_dare_mask_is_independent_of_chunking_and_has_the_right_rate(monkeypatch):
    shape, density, seed = (300, 301), 0.3, 12345
    whole = kernels.dare_mask(shape, density, seed)
    monkeypatch.setattr(kernels, "CPU_CHUNK", 1000)
    assert torch.equal(kernels.dare_mask(shape, density, seed), whole)
    n = whole.numel()
    assert abs(float(whole.float().mean()) - density) < 5 * math.sqrt(density * (1 - density) / n)
    other = kernels.dare_mask(shape, density, seed + 1)
    both = float((whole & other).float().mean())
    assert abs(both - density**2) < 5 * math.sqrt(density**2 * (1 - density**2) / n)  # independent seeds
    flat = whole.reshape(-1)
    pairs = float((flat[:-1] & flat[1:]).float().mean())
    assert abs(pairs - density**2) < 5 * math.sqrt(density**2 / n)  # neighbours independent
    assert int(kernels.dare_mask((1000,), 0.0, 1).sum()) == 0
    assert bool(kernels.dare_mask((1000,), 1.0, 1).all())


@pytest.mark.parametrize("consensus", [True, False])
@pytest.mark.parametrize("rescale", [True, False])
def test_dare_matches_reference_with_the_same_masks(small_chunks, consensus, rescale):
    shape = (33, 31)
    base, tensors = _family(shape, dtype=torch.bfloat16)
    specs = [TaskVectorSpec(0.6, 0.4, seed=11), TaskVectorSpec(0.8, 0.7, seed=12)]
    masks = [kernels.dare_mask(shape, sp.density, sp.seed) for sp in specs]
    kw = dict(sparsification="random", consensus=consensus, normalize=consensus, lam=1.1, rescale=rescale)
    got = task_vector_merge(base, tensors, specs, **kw)
    want = ref_task_vector(base, tensors, specs, masks=masks, **kw)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)
    dropped_everywhere = ~(masks[0] | masks[1])
    assert torch.equal(got[dropped_everywhere], base.float()[dropped_everywhere])


def test_dare_without_a_seed_is_an_error():
    base, tensors = _family((10,))
    with pytest.raises(Exception, match="seed"):
        task_vector_merge(base, tensors, [TaskVectorSpec(1.0, 0.5), TaskVectorSpec(1.0, 0.5)],
                          sparsification="random", consensus=True, normalize=False, lam=1.0, rescale=True)


# --------------------------------------------------------------------------- linear, slerp


def test_linear_matches_reference(small_chunks):
    _, tensors = _family((70, 3), dtype=torch.bfloat16, models=3)
    weights = [0.2, 0.5, 0.3]
    want = torch.zeros(70, 3)
    for t, w in zip(tensors, weights):
        want.add_(t.float(), alpha=w)
    assert torch.equal(kernels.linear_merge(tensors, weights, normalize=False), want)
    assert torch.equal(kernels.linear_merge(tensors, weights, normalize=True), want / 1.0)
    with pytest.raises(Exception, match="sum to 0"):
        kernels.linear_merge(tensors[:2], [1.0, -1.0], normalize=True)


def test_slerp_matches_the_closed_form(small_chunks):
    g = torch.Generator().manual_seed(3)
    v0, v1 = torch.randn(500, generator=g), torch.randn(500, generator=g)
    t = 0.3
    a, b = v0.double(), v1.double()
    theta = math.acos(float(torch.dot(a / a.norm(), b / b.norm())))
    c0, c1 = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    assert torch.allclose(kernels.slerp_merge(t, v0, v1), v0 * c0 + v1 * c1, rtol=1e-6, atol=1e-7)
    assert torch.equal(kernels.slerp_merge(0.25, v0, 2 * v0), v0 * 0.75 + 2 * v0 * 0.25)  # parallel: lerp


def test_kernels_do_not_modify_inputs(small_chunks):
    base, tensors = _family((123,), dtype=torch.bfloat16)
    before = [base.clone()] + [t.clone() for t in tensors]
    specs = [TaskVectorSpec(0.5, 0.5, seed=1), TaskVectorSpec(0.5, 0.5, seed=2)]
    for sp in ("magnitude", "random", None):
        task_vector_merge(base, tensors, specs, sparsification=sp, consensus=True, normalize=True, lam=1.0, rescale=True)
    kernels.slerp_merge(0.5, base, tensors[0])
    assert all(torch.equal(x, y) for x, y in zip(before, [base] + tensors))


@pytest.mark.parametrize("workers", [2, 3])
def test_threaded_chunks_give_identical_results(small_chunks, workers):
    base, tensors = _family((40, 53), dtype=torch.bfloat16, models=3)
    specs = [TaskVectorSpec(0.6, 0.4, seed=1), TaskVectorSpec(0.7, 0.5, seed=2), TaskVectorSpec(0.2, 0.9, seed=3)]
    runs = {}
    for label, ctx in (("seq", None), ("par", workers)):
        outs = []
        threads_before = torch.get_num_threads()
        with kernels.cpu_parallelism(ctx if ctx else 1):
            for sp in ("magnitude", "random", None):
                outs.append(task_vector_merge(base, tensors, specs, sparsification=sp, consensus=True, normalize=True, lam=0.9, rescale=True))
            outs.append(kernels.linear_merge(tensors, [0.2, 0.3, 0.5], normalize=True))
            outs.append(kernels.slerp_merge(0.3, base, tensors[0]))
        assert torch.get_num_threads() == threads_before
        runs[label] = outs
    assert all(torch.equal(a, b) for a, b in zip(runs["seq"], runs["par"]))


def test_errors_in_worker_threads_propagate_after_all_threads_stop():
    import threading

    seen, failed_in = [], []

    def fn(i):
        seen.append(i)
        if i == 7:
            failed_in.append(threading.get_ident())
            raise ValueError("chunk 7 failed")

    with kernels.cpu_parallelism(3), pytest.raises(ValueError, match="chunk 7"):
        kernels._for_each(40, fn, torch.device("cpu"))
    assert 7 in seen and len(set(seen)) == len(seen)


BIG = 4 * 65536 + 3  # several default-size chunks, odd length


def test_ties_on_a_big_tensor_matches_reference_bit_for_bit():
    base, tensors = _family((BIG,), dtype=torch.bfloat16, noise=0.002)  # bf16 deltas: massive ties
    specs = [TaskVectorSpec(0.6, 0.5), TaskVectorSpec(0.7, 0.03)]
    kw = dict(sparsification="magnitude", consensus=True, normalize=True, lam=1.0, rescale=False)
    assert torch.equal(task_vector_merge(base, tensors, specs, **kw), ref_task_vector(base, tensors, specs, **kw))
