"""The cache of large CPU outputs (gradients, projected rows): same values, reuse, limits."""

from __future__ import annotations

import threading

import pytest
import torch

import trmath
from trmath import _backend

# 64 x 32768 float32 = 8 MiB: the smallest outputs that come from the cache.
N, V = 64, 32768


@pytest.fixture
def cache_limit():
    """Restore the cache's limit after a test that changes it."""
    before = trmath.buffer_cache_info()["limit"]
    yield
    trmath.set_buffer_cache(before)


def _rows(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = (3 * torch.randn(N, V, generator=g)).to(dtype)
    w = (z.float() + 0.3 * torch.randn(N, V, generator=g)).to(dtype)
    return z, w


def _kl_grads(z, w):
    z = z.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    trmath.kl(z, w).sum().backward()
    return z.grad, w.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_cached_gradients_equal_uncached(dtype, cache_limit):
    z, w = _rows(dtype)
    trmath.set_buffer_cache(0)
    ref = _kl_grads(z, w)
    trmath.set_buffer_cache(1 << 30)
    for _ in range(2):  # the second round reuses the first round's buffers
        got = _kl_grads(z, w)
        for a, b in zip(got, ref):
            assert a.dtype == dtype and a.shape == (N, V) and a.is_contiguous()
            assert torch.equal(a, b)


def test_freed_buffer_is_reused_and_live_one_is_not(cache_limit):
    trmath.set_buffer_cache(1 << 30)
    trmath.empty_buffer_cache()
    z, w = _rows(torch.float32)
    gz, gw = _kl_grads(z, w)
    held = {gz.data_ptr(), gw.data_ptr()}
    ref_z = gz.clone()
    info = trmath.buffer_cache_info()
    assert info["cached_buffers"] == 0
    # While gz and gw are alive, new gradients get other memory.
    gz2, gw2 = _kl_grads(z, w)
    assert not ({gz2.data_ptr(), gw2.data_ptr()} & held)
    del gz2, gw2
    assert trmath.buffer_cache_info()["cached_buffers"] == 2
    before = trmath.buffer_cache_info()["reused"]
    gz3, gw3 = _kl_grads(z, w)
    assert trmath.buffer_cache_info()["reused"] == before + 2
    assert torch.equal(gz, ref_z)  # a live output is never handed out again
    assert torch.equal(gz3, ref_z)


def test_empty_cache_keeps_live_outputs(cache_limit):
    trmath.set_buffer_cache(1 << 30)
    z, w = _rows(torch.float32, seed=1)
    gz, _ = _kl_grads(z, w)
    ref = gz.clone()
    trmath.empty_buffer_cache()
    assert trmath.buffer_cache_info()["cached_bytes"] == 0
    _kl_grads(z * 0.5, w)  # other outputs, allocated and freed meanwhile
    assert torch.equal(gz, ref)
    gz.mul_(2.0)  # writable in place
    assert torch.equal(gz, 2.0 * ref)


def test_limit_bounds_what_is_kept(cache_limit):
    z, w = _rows(torch.float32, seed=2)
    trmath.set_buffer_cache(12 << 20)  # room for one 8 MiB gradient, not two
    trmath.empty_buffer_cache()
    _kl_grads(z, w)
    info = trmath.buffer_cache_info()
    assert info["cached_bytes"] <= 12 << 20
    assert info["cached_buffers"] == 1
    trmath.set_buffer_cache(0)
    info = trmath.buffer_cache_info()
    assert info["limit"] == 0 and info["cached_bytes"] == 0 and info["cached_buffers"] == 0
    fresh = trmath.buffer_cache_info()["fresh"]
    _kl_grads(z, w)  # disabled: plain torch allocations, nothing counted or kept
    info = trmath.buffer_cache_info()
    assert info["fresh"] == fresh and info["cached_buffers"] == 0


def test_project_kl_rows_from_the_cache_equal_uncached(cache_limit):
    z, w = _rows(torch.float32, seed=3)
    trmath.set_buffer_cache(0)
    ref = trmath.project_kl(z, w, 0.01)
    trmath.set_buffer_cache(1 << 30)
    for _ in range(2):
        assert torch.equal(trmath.project_kl(z, w, 0.01), ref)


def test_concurrent_backwards_share_the_cache(cache_limit):
    trmath.set_buffer_cache(1 << 30)
    z, w = _rows(torch.float32, seed=4)
    ref = _kl_grads(z, w)
    errors = []

    def work():
        try:
            for _ in range(3):
                got = _kl_grads(z, w)
                if not (torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])):
                    errors.append("gradients differ")
        except Exception as e:  # reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1"])
def test_bad_limit(bad):
    with pytest.raises(ValueError, match="max_bytes"):
        trmath.set_buffer_cache(bad)


def test_small_outputs_bypass_the_cache():
    t = _backend._empty_large((4, 8), torch.float32)
    assert t.shape == (4, 8) and t.dtype == torch.float32
    before = trmath.buffer_cache_info()
    _backend._empty_large((4, 8), torch.float32)
    after = trmath.buffer_cache_info()
    assert (after["reused"], after["fresh"]) == (before["reused"], before["fresh"])
