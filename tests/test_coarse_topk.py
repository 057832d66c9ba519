"""The streaming C++ top-k search behind trmath.topk_logprobs on CPU tensors."""

from __future__ import annotations

import pytest
import torch

import trmath
from trmath import _backend, _ops

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _reference(z: torch.Tensor, k: int) -> torch.Tensor:
    """Value descending, then index ascending (a stable sort of the negated values)."""
    return torch.sort(-z.double(), dim=-1, stable=True).indices[..., :k]


@pytest.mark.parametrize("dt", DTYPES, ids=str)
@pytest.mark.parametrize("V,k", [(1, 1), (7, 7), (50, 5), (130, 1), (1000, 20), (40000, 64)])
def test_topk_rows_matches_a_stable_sort(dt, V, k):
    g = torch.Generator().manual_seed(V + k)
    z = (torch.randn(5, V, generator=g, dtype=torch.float64) * 3).to(dt)
    assert torch.equal(_backend.topk_rows(z, k), _reference(z, k))
    # strided rows (a transposed view), and a leading batch shape
    zt = (torch.randn(V, 4, generator=g, dtype=torch.float64) * 3).to(dt).t()
    assert torch.equal(_backend.topk_rows(zt, k), _reference(zt, k))
    z3 = z.reshape(5, 1, V).expand(5, 2, V)
    assert torch.equal(_backend.topk_rows(z3, k), _reference(z3, k))


def test_topk_rows_ties_and_masked_tokens():
    inf = float("inf")
    z = torch.tensor([[1.0, 3.0, 3.0, -inf, 3.0, 0.0, -inf]])
    assert _backend.topk_rows(z, 4).tolist() == [[1, 2, 4, 0]]
    assert _backend.topk_rows(z, 7).tolist() == [[1, 2, 4, 0, 5, 3, 6]]
    assert _backend.topk_rows(torch.full((1, 5), -inf), 3).tolist() == [[0, 1, 2]]
    # bf16 rows are full of ties: the lower index always wins
    g = torch.Generator().manual_seed(3)
    zb = torch.randint(-3, 4, (16, 300), generator=g).to(torch.bfloat16)
    assert torch.equal(_backend.topk_rows(zb, 25), _reference(zb, 25))


def test_topk_rows_is_deterministic_across_threads_and_batch():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(33, 5000, generator=g)
    a = _backend.topk_rows(z, 20)
    n = trmath.num_threads()
    try:
        trmath.set_num_threads(1)
        b = _backend.topk_rows(z, 20)
    finally:
        trmath.set_num_threads(n)
    assert torch.equal(a, b)
    assert torch.equal(_backend.topk_rows(z[7:8], 20), a[7:8])


def test_builder_uses_the_same_set_as_torch_topk_without_ties():
    g = torch.Generator().manual_seed(8)
    mu, pi = torch.randn(6, 3000, generator=g), torch.randn(6, 3000, generator=g)
    ids, _, _ = trmath.topk_logprobs(mu, pi, 20)
    _ops._FORCE_TORCH[0] = True
    try:
        ids_t, _, _ = trmath.topk_logprobs(mu, pi, 20)
    finally:
        _ops._FORCE_TORCH[0] = False
    assert torch.equal(ids, ids_t)
    assert torch.equal(ids, torch.topk(mu, 20).indices)


def test_topk_rows_rejects_bad_k():
    with pytest.raises(ValueError, match="k: must be in"):
        _backend.topk_rows(torch.zeros(2, 5), 6)


@pytest.mark.parametrize("dt", DTYPES, ids=str)
def test_sorted_path_gives_the_kernels_ids(dt):
    """``topk_rows_sorted`` (the CUDA path for k above the kernel's limit) on CPU tensors: the
    CPU kernel's ids, with ties, masked tokens, +-0 and strided views."""
    inf = float("inf")
    g = torch.Generator().manual_seed(11)
    z = torch.round(2 * torch.randn(6, 700, generator=g, dtype=torch.float64))
    z[1] = 0.5
    z[2, ::2] = -inf
    z[3] = torch.tensor([0.0, -0.0, 1.0, -1.0], dtype=torch.float64)[torch.randint(0, 4, (700,), generator=g)]
    z[4, :-2] = -inf
    z = z.to(dt)
    for k in (1, 7, 350, 700):
        assert torch.equal(_backend.topk_rows_sorted(z, k), _backend.topk_rows(z, k)), k
        zt = z.t().contiguous().t()[:, 1::2]
        assert torch.equal(_backend.topk_rows_sorted(zt, min(k, 350)), _backend.topk_rows(zt, min(k, 350))), k
    zp = torch.tensor([[0.0, -0.0, -inf, -0.0, 0.0, 2.0]], dtype=dt)
    assert _backend.topk_rows_sorted(zp, 6).tolist() == [[5, 0, 1, 3, 4, 2]]


@pytest.mark.parametrize("dt", DTYPES, ids=str)
def test_nan_ranks_as_minus_inf_even_at_the_start_of_a_skipped_block(dt):
    """NaN is invalid input, but with ``validate=False`` the search must still return the true
    largest values: a NaN at the start of a 64-element block once became that block's maximum
    and hid the larger values after it."""
    nan = float("nan")
    z = torch.zeros(2, 300, dtype=torch.float64)
    z[:, 5] = nan  # with k = 5 the blocks start at 5, 69, 133, ...
    z[:, 6] = 5.0
    z[:, 100] = 10.0
    z[1, 69] = nan
    z[1, 70] = 7.0
    z = z.to(dt)
    want = [[100, 6, 0, 1, 2], [100, 70, 6, 0, 1]]
    assert _backend.topk_rows(z, 5).tolist() == want
    assert _backend.topk_rows_sorted(z, 5).tolist() == want
