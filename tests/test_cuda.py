"""The CUDA kernels of the exact reductions, on a GPU (skipped without one or without the kernels).

* Accuracy: the adversarial families (near-identical rows with and without a logit offset,
  peaked rows of spread 1e4, masked tokens, constant rows) at V from 1 to 262144, every dtype,
  two temperatures: against mpmath directly, and against the CPU kernels (themselves verified
  against mpmath) on larger batches.
* Gradients against the CPU kernels' gradients.
* Determinism: a row's result is bitwise the same alone, in a batch, at any position.
* Layouts (strided, transposed), the caller's stream, bad input, ``torch.compile``.
* The top-k search of ``trmath.topk_logprobs``: the CPU kernel's ids, bit for bit.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import trmath
from trmath import _backend, _ops
from trmath.testing import StableRNG, adversarial_batch, cast, mp_batch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not _backend.has_cuda(), reason="extension built without TRMATH_CUDA"),
]

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
PAIR = ("kl", "tv", "js")
SINGLE = ("logsumexp", "entropy", "token_logprobs", "token_logprobs+entropy")
# Each side is within TARGETS.md's bound of the exact value, so they agree to twice it.
TOL = {torch.float16: 2e-5, torch.bfloat16: 2e-5, torch.float32: 2e-5, torch.float64: 2e-12}
TARGET = {torch.float16: 1e-5, torch.bfloat16: 1e-5, torch.float32: 1e-5, torch.float64: 1e-12}


def _dname(d) -> str:
    return str(d).replace("torch.", "")


def _call(func, z, w=None, tokens=None, **kw):
    if func in PAIR:
        return (getattr(trmath, func)(z, w, **kw),)
    if func in ("logsumexp", "entropy"):
        return (getattr(trmath, func)(z, **kw),)
    res = trmath.token_logprobs(z, tokens, return_entropy=func.endswith("entropy"), **kw)
    return res if isinstance(res, tuple) else (res,)


def _tokens(z: torch.Tensor, seed: int) -> torch.Tensor:
    """A finite token per row (the first unmasked one after a random start)."""
    n, V = z.shape
    rng = StableRNG(seed)
    start = torch.from_numpy(rng.integers(0, V, n).astype(np.int64))
    fin = torch.isfinite(z.to(torch.float64))
    idx = (torch.arange(V)[None, :] - start[:, None]) % V
    order = torch.where(fin, idx, V + idx)
    return torch.argmin(order, dim=-1)


def _assert_close(a, b, rtol, what, atol=1e-30):
    a64 = a.detach().cpu().to(torch.float64)
    b64 = b.detach().cpu().to(torch.float64)
    same = (a64 == b64) | (torch.isnan(a64) & torch.isnan(b64))
    err = torch.where(same, 0.0, (a64 - b64).abs())
    ok = same | (err <= rtol * torch.maximum(a64.abs(), b64.abs()) + atol)
    if not bool(ok.all()):
        bad = torch.nonzero(~ok.reshape(-1)).reshape(-1)[:5].tolist()
        raise AssertionError(f"{what}: {int((~ok).sum())} of {ok.numel()} differ beyond rtol={rtol}; e.g. "
                             f"{[(i, float(a64.reshape(-1)[i]), float(b64.reshape(-1)[i])) for i in bad]}")


def _batch(func, V, n, seed, dtype):
    """Adversarial pairs (divergences) or rows (single-row reductions), as CPU tensors."""
    if func in PAIR:
        return adversarial_batch(n, V, seed, dtype, pairs=True, allow_infinite_kl=func != "kl")
    fams, z, _ = adversarial_batch(n, V, seed, dtype, pairs=False)
    return fams, z, None


@pytest.mark.parametrize("dtype", DTYPES, ids=_dname)
@pytest.mark.parametrize("func", PAIR + SINGLE)
@pytest.mark.parametrize("V", (1, 3, 1000, 32771))
def test_against_mpmath(func, V, dtype):
    n = 14
    fams, z, w = _batch(func, V, n, 11 + V, dtype)
    tokens = _tokens(z, 5)
    T = 0.7 if V % 2 else 1.0
    outs = _call(func, z.cuda(), None if w is None else w.cuda(), tokens.cuda(), temperature=T)
    name = func.split("+")[0]
    arrays = (z, w) if w is not None else (z,)
    ref = mp_batch(name, *arrays, tokens=tokens if name == "token_logprobs" else None, temperature=T)
    _assert_close(outs[0], torch.from_numpy(np.asarray(ref, dtype=np.float64)), TARGET[dtype],
                  f"{func} V={V} {dtype} vs mpmath (families {sorted(set(fams))})")
    if func.endswith("+entropy"):
        refh = mp_batch("entropy", z, temperature=T)
        _assert_close(outs[1], torch.from_numpy(np.asarray(refh, dtype=np.float64)), TARGET[dtype],
                      f"{func} entropy V={V} vs mpmath")


@pytest.mark.parametrize("dtype", DTYPES, ids=_dname)
@pytest.mark.parametrize("func", PAIR + SINGLE)
@pytest.mark.parametrize("V", (7, 4099, 151936, 262144))
def test_against_cpu_kernels(func, V, dtype):
    n = 48 if V < 100000 else 12
    _, z, w = _batch(func, V, n, 3 + V, dtype)
    tokens = _tokens(z, 9)
    for T in (1.0, 0.7):
        ref = _call(func, z, w, tokens, temperature=T)
        got = _call(func, z.cuda(), None if w is None else w.cuda(), tokens.cuda(), temperature=T)
        for k, (a, b) in enumerate(zip(got, ref)):
            assert a.device.type == "cuda" and a.dtype == b.dtype and a.shape == b.shape
            _assert_close(a, b, TOL[dtype], f"{func} output {k}, V={V}, T={T}")


def _grads(func, z, w, tokens, T, seed=1):
    zz = z.detach().clone().requires_grad_(True)
    ww = w.detach().clone().requires_grad_(True) if w is not None else None
    outs = _call(func, zz, ww, tokens, temperature=T)
    rng = StableRNG(seed)
    loss = 0.0
    for o in outs:
        g = torch.from_numpy(rng.uniform(o.numel(), 0.5, 1.5).reshape(o.shape)).to(o.dtype).to(o.device)
        loss = loss + (torch.where(torch.isfinite(o), o, 0.0) * g).sum()
    loss.backward()
    return (zz.grad,) + ((ww.grad,) if ww is not None else ())


def _near_rows(n, V, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    z = 2.0 * torch.randn(n, V, generator=g, dtype=torch.float64)
    step = torch.where(torch.arange(n)[:, None] % 2 == 0, 1e-3, 1.0).to(torch.float64)
    w = z + step * torch.randn(n, V, generator=g, dtype=torch.float64)
    m = torch.rand(n, V, generator=g) < 0.2
    m[:, 0] = False
    z[m] = -math.inf
    w[m] = -math.inf
    return z.to(dtype), w.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dname)
@pytest.mark.parametrize("func", PAIR + SINGLE)
def test_gradients_against_cpu(func, dtype):
    z, w = _near_rows(6, 5003, dtype, 4)
    w = w if func in PAIR else None
    tokens = _tokens(z, 2)
    ref = _grads(func, z, w, tokens, 0.7)
    got = _grads(func, z.cuda(), None if w is None else w.cuda(), tokens.cuda(), 0.7)
    # Gradients come back in the input dtype: 16-bit ones may round to neighbouring values.
    elem = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 0.0, torch.float64: 0.0}[dtype]
    for k, (a, b) in enumerate(zip(got, ref)):
        assert a.device.type == "cuda" and a.dtype == dtype and a.shape == b.shape
        a64, b64 = a.cpu().to(torch.float64), b.to(torch.float64)
        row_max = torch.maximum(a64.abs().amax(-1, keepdim=True), b64.abs().amax(-1, keepdim=True))
        allowed = elem * torch.maximum(a64.abs(), b64.abs()) + TOL[dtype] * row_max + 1e-13
        err = (a64 - b64).abs()
        assert bool((err <= allowed).all()), (func, k, float((err - allowed).max()))


def _sibling(name: str):
    # The suite imports test files by path (--import-mode=importlib), so a sibling module is
    # loaded from its file.
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).with_name(name + ".py")
    spec = importlib.util.spec_from_file_location("_trmath_" + name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64), ids=_dname)
@pytest.mark.parametrize("T", (1.0, 0.7))
def test_confident_token_gradients_against_mpmath(dtype, T):
    """The token's own entry g (1 - p_t) / T and the entropy's log p + H where p_t -> 1 (see
    tests/test_exact_grad.py), on the GPU kernels."""
    _sibling("test_exact_grad").check_confident_token_gradients(dtype, T, device="cuda")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16, torch.float64), ids=_dname)
@pytest.mark.parametrize("T", (1.0, 0.05))
def test_dominant_token_gradients_against_mpmath(dtype, T):
    """KL's and JS's entry at a token holding nearly all of p (JS's d/dw: of q) is minus the sum
    of the row's others where that is the more accurate, as on the CPU (tests/test_exact_grad.py):
    the direct formula is all rounding on such rows."""
    _sibling("test_exact_grad").check_dominant_token_gradients(dtype, T, device="cuda")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64), ids=_dname)
@pytest.mark.parametrize("func", ("kl", "js"))
def test_dominant_token_gradients_of_long_rows_against_cpu(func, dtype):
    """Rows of several backward chunks (the dominant token's records merged across them): peaked
    rows, the peak in the first, a middle and the last chunk, against the CPU kernels (checked
    against mpmath by tests/test_exact_grad.py) to twice the target of the row's largest entry,
    and the same bits for the row alone and moved in the batch."""
    V, n = 20011, 9
    g = torch.Generator().manual_seed(7)
    z = torch.randn(n, V, generator=g, dtype=torch.float64)
    w = z + 0.3 * torch.randn(n, V, generator=g, dtype=torch.float64)
    for r, (top, gap) in enumerate([(0, 20.0), (9000, 30.0), (V - 1, 50.0)] * 3):
        z[r, top] += gap
        w[r, top] += gap if r < 3 else (0.0 if r < 6 else gap + 3.0)
    z, w = z.to(dtype), w.to(dtype)
    up = 0.5 + torch.arange(n, dtype=torch.float64) / n  # upstream gradient per row

    def grads(zi, wi, ui, device):
        zz = zi.detach().clone().to(device).requires_grad_(True)
        ww = wi.detach().clone().to(device).requires_grad_(True)
        out = getattr(trmath, func)(zz, ww, temperature=0.7)
        (out * ui.to(out.dtype).to(device)).sum().backward()
        return zz.grad.cpu(), ww.grad.cpu()

    ref = grads(z, w, up, "cpu")
    got = grads(z, w, up, "cuda")
    elem = {torch.bfloat16: 2.0**-7, torch.float32: 0.0, torch.float64: 0.0}[dtype]
    for k, (a, b) in enumerate(zip(got, ref)):
        a64, b64 = a.to(torch.float64), b.to(torch.float64)
        row_max = torch.maximum(a64.abs().amax(-1, keepdim=True), b64.abs().amax(-1, keepdim=True))
        allowed = elem * torch.maximum(a64.abs(), b64.abs()) + TOL[dtype] * row_max + 1e-30
        err = (a64 - b64).abs()
        assert bool((err <= allowed).all()), (func, k, float((err / row_max).max()))
    perm = torch.roll(torch.arange(n), 4)
    moved = grads(z[perm], w[perm], up[perm], "cuda")
    for r in (1, 5):
        one = grads(z[r:r + 1], w[r:r + 1], up[r:r + 1], "cuda")
        pos = int((perm == r).nonzero())
        for a, b in zip(got, one):
            assert torch.equal(a[r:r + 1], b), (func, r)
        for a, c in zip(got, moved):
            assert torch.equal(a[r], c[pos]), (func, r)


@pytest.mark.parametrize("func", PAIR + SINGLE)
def test_row_result_independent_of_batch(func):
    z, w = _near_rows(40, 3001, torch.float32, 8)
    z, w = z.cuda(), w.cuda()
    w = w if func in PAIR else None
    tokens = _tokens(z.cpu(), 3).cuda()
    full = _call(func, z, w, tokens)
    for r in (0, 17, 39):
        sub = slice(r, r + 1)
        one = _call(func, z[sub], None if w is None else w[sub], tokens[sub])
        perm = torch.roll(torch.arange(40, device="cuda"), 5)
        moved = _call(func, z[perm], None if w is None else w[perm], tokens[perm])
        pos = int((perm == r).nonzero())
        for a, b, c in zip(full, one, moved):
            assert torch.equal(a[r:r + 1], b), (func, r)
            assert torch.equal(a[r], c[pos]), (func, r)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dname)
@pytest.mark.parametrize("func", PAIR + SINGLE)
def test_value_the_same_with_and_without_a_backward(func, dtype):
    """A call that keeps no statistics (no gradient wanted: TV's full pass then sums its value
    alone) gives the same bits as one that keeps them for a backward."""
    _, z, w = _batch(func, 40000, 24, 21, dtype)
    tokens = _tokens(z, 4).cuda()
    z, w = z.cuda(), None if w is None else w.cuda()
    for T in (1.0, 0.7):
        plain = _call(func, z, w, tokens, temperature=T)
        zg = z.detach().clone().requires_grad_(True)
        kept = _call(func, zg, w, tokens, temperature=T)
        assert all(k.requires_grad for k in kept)  # the path that keeps statistics
        for a, b in zip(plain, kept):
            assert torch.equal(torch.nan_to_num(a, nan=-7.0), torch.nan_to_num(b.detach(), nan=-7.0)), (func, T)


@pytest.mark.parametrize("func", PAIR + SINGLE)
def test_strided_inputs(func):
    z, w = _near_rows(8, 2 * 1501, torch.float32, 12)
    zc, wc = z.cuda(), w.cuda()
    tokens = (_tokens(z[:, ::2], 1)).cuda()
    w_ = wc[:, ::2] if func in PAIR else None
    a = _call(func, zc[:, ::2], w_, tokens)
    b = _call(func, zc[:, ::2].contiguous(), None if w_ is None else w_.contiguous(), tokens)
    for x, y in zip(a, b):
        assert torch.equal(x, y), func
    zt = zc.t().contiguous().t()
    wt = wc.t().contiguous().t() if func in PAIR else None
    tok2 = _tokens(z, 1).cuda()
    for x, y in zip(_call(func, zt, wt, tok2), _call(func, zc, wc if func in PAIR else None, tok2)):
        assert torch.equal(x, y), func


def test_runs_on_the_callers_stream():
    z, w = _near_rows(64, 20000, torch.bfloat16, 13)
    z, w = z.cuda(), w.cuda()
    ref = trmath.kl(z, w)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out = trmath.kl(z, w)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    assert torch.equal(out, ref)


def test_bad_input_names_the_row():
    z, w = _near_rows(4, 100, torch.float32, 14)
    z[2, 7] = math.nan
    with pytest.raises(ValueError, match=r"p_logits.*2"):
        trmath.kl(z.cuda(), w.cuda())
    with pytest.raises(ValueError, match=r"logits.*2"):
        trmath.logsumexp(z.cuda())
    tok = torch.tensor([0, 1, 2, 100]).cuda()
    with pytest.raises(ValueError, match="tokens"):
        trmath.token_logprobs(w.cuda(), tok)


def test_nan_propagates_without_validation():
    z, w = _near_rows(3, 100, torch.float32, 15)
    z[1, 3] = math.nan
    out = trmath.kl(z.cuda(), w.cuda(), validate=False).cpu()
    assert math.isnan(float(out[1])) and torch.isfinite(out[[0, 2]]).all()


def test_torch_compile():
    z, w = _near_rows(8, 4000, torch.float32, 16)
    z, w = z.cuda().requires_grad_(True), w.cuda()

    def f(a, b):
        return (trmath.kl(a, b) + trmath.entropy(a)).sum()

    g = torch.compile(f, fullgraph=True)
    loss = g(z, w)
    loss.backward()
    gz = z.grad.clone()
    z.grad = None
    ref = f(z, w)
    ref.backward()
    assert torch.allclose(loss, ref, rtol=1e-6)
    assert torch.allclose(gz, z.grad, rtol=1e-5, atol=1e-9)


def test_dispatch_uses_the_kernels_and_torch_backend_agrees():
    """CUDA tensors reach the compiled kernels; the torch backend on the same tensors agrees."""
    z, w = _near_rows(16, 40000, torch.float32, 17)
    z, w = z.cuda(), w.cuda()
    assert _ops.use_cuda(z)
    got = trmath.tv(z, w)
    _ops._FORCE_TORCH[0] = True
    try:
        ref = trmath.tv(z, w)
    finally:
        _ops._FORCE_TORCH[0] = False
    _assert_close(got, ref, 2e-5, "tv cuda vs torch backend")
    assert _backend.cuda_device_name()


# ---------------------------------------------------------------------------------------------
# The top-k search (trmath.topk_logprobs): the CUDA kernel must give the CPU kernel's ids, bit
# for bit -- value descending, ties to the lower index, -0 == +0, -inf ordered like any value.
# ---------------------------------------------------------------------------------------------
def _topk_rows(n: int, V: int, dtype, seed: int) -> torch.Tensor:
    """CPU rows cycling through: continuous values, values rounded to a few integers (ties
    everywhere), a constant row, half the entries masked to -inf, all but 3 masked, and a mix of
    +0, -0 and +-1."""
    g = torch.Generator().manual_seed(seed)
    z = 3.0 * torch.randn(n, V, generator=g, dtype=torch.float64)
    inf = math.inf
    for r in range(n):
        fam = r % 6
        if fam == 1:
            z[r] = torch.round(z[r] / 2)
        elif fam == 2:
            z[r] = 0.25 * (r + 1)
        elif fam == 3:
            z[r] = torch.where(torch.rand(V, generator=g) < 0.5, -inf, torch.round(z[r]))
        elif fam == 4:
            keep = torch.zeros(V, dtype=torch.bool)
            keep[torch.randint(0, V, (3,), generator=g)] = True
            z[r] = torch.where(keep, z[r], -inf)
        elif fam == 5:
            c = torch.tensor([0.0, -0.0, 1.0, -1.0], dtype=torch.float64)
            z[r] = c[torch.randint(0, 4, (V,), generator=g)]
    return z.to(dtype)


def _assert_same_ids(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert got.device.type == "cuda" and got.dtype == torch.int64, what
    got = got.cpu()
    assert got.shape == ref.shape, (what, tuple(got.shape), tuple(ref.shape))
    if not torch.equal(got, ref):
        bad = (got != ref).reshape(-1, got.shape[-1]).any(-1).nonzero().reshape(-1).tolist()
        raise AssertionError(f"{what}: ids differ from the CPU kernel's in rows {bad[:8]}")


@pytest.mark.parametrize("dtype", DTYPES, ids=_dname)
@pytest.mark.parametrize("V", (1, 7, 1000, 32771, 151936))
def test_topk_ids_match_the_cpu_kernel(V, dtype):
    n = 12 if V < 100000 else 6
    z = _topk_rows(n, V, dtype, 100 + V)
    zc = z.cuda()
    kmax = _backend.cuda_topk_max_k()
    assert kmax >= 1024
    # k == V and k > kmax (the stable-sort path) included where V allows
    for k in sorted({k for k in (1, 5, 64, 1000, kmax, kmax + 1, V) if k <= V}):
        _assert_same_ids(_backend.cuda_topk_rows(zc, k), _backend.topk_rows(z, k), f"V={V} k={k}")


@pytest.mark.parametrize("dtype", DTYPES, ids=_dname)
def test_topk_ids_layouts(dtype):
    z = _topk_rows(24, 3001, dtype, 7)
    zc = z.cuda()
    views = {
        "last-dim stride 2": (zc[:, ::2], z[:, ::2]),
        "transposed storage": (zc.t().contiguous().t(), z),
        "unaligned rows": (zc[1:, 1:], z[1:, 1:]),
        "row stride 3": (zc[::3], z[::3]),
        "leading dims": (zc.reshape(2, 3, 4, 3001), z.reshape(2, 3, 4, 3001)),
        "broadcast rows": (zc[5:6].expand(4, 3001), z[5:6].expand(4, 3001)),
        "one row, no batch": (zc[3], z[3]),
    }
    for k in (1, 20, 1500):
        for name, (a, b) in views.items():
            _assert_same_ids(_backend.cuda_topk_rows(a, k), _backend.topk_rows(b, k), f"{name} k={k}")
    for shape in ((0, 3001), (2, 0, 3001)):
        e = torch.zeros(shape, dtype=dtype, device="cuda")
        out = _backend.cuda_topk_rows(e, 3)
        assert out.shape == (*shape[:-1], 3) and out.device.type == "cuda"
        assert out.shape == _backend.topk_rows(e.cpu(), 3).shape


def test_topk_ids_known_rows_and_determinism():
    inf = math.inf
    z = torch.tensor([[1.0, 3.0, 3.0, -inf, 3.0, 0.0, -inf]], device="cuda")
    assert _backend.cuda_topk_rows(z, 4).tolist() == [[1, 2, 4, 0]]
    assert _backend.cuda_topk_rows(z, 7).tolist() == [[1, 2, 4, 0, 5, 3, 6]]
    assert _backend.cuda_topk_rows(torch.full((1, 5), -inf, device="cuda"), 3).tolist() == [[0, 1, 2]]
    pm0 = torch.tensor([[0.0, -0.0, -0.0, 0.0, 1.0]], device="cuda")
    assert _backend.cuda_topk_rows(pm0, 5).tolist() == [[4, 0, 1, 2, 3]]
    # a row's ids do not depend on the batch, its position or the stream
    zb = _topk_rows(40, 5000, torch.bfloat16, 9).cuda()
    full = _backend.cuda_topk_rows(zb, 50)
    perm = torch.roll(torch.arange(40, device="cuda"), 7)
    assert torch.equal(_backend.cuda_topk_rows(zb[perm], 50), full[perm])
    assert torch.equal(_backend.cuda_topk_rows(zb[17:18], 50), full[17:18])
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        other = _backend.cuda_topk_rows(zb, 50)
    torch.cuda.current_stream().wait_stream(s)
    assert torch.equal(other, full)
    # NaN ranks as -inf (rows with NaN are invalid input; this only pins the kernel down)
    zn = torch.tensor([[2.0, math.nan, -inf, 1.0, math.nan]], device="cuda")
    assert _backend.cuda_topk_rows(zn, 5).tolist() == [[0, 3, 1, 2, 4]]
    assert torch.equal(_backend.cuda_topk_rows(zn, 5), _backend.topk_rows_sorted(zn, 5))
    for k in (0, 6):
        with pytest.raises(ValueError, match="k: must be in"):
            _backend.cuda_topk_rows(zn, k)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dname)
def test_topk_logprobs_on_cuda_matches_cpu(dtype):
    """Through the public builder: the same kept ids as on the CPU (rows full of ties, where
    torch.topk's order is unspecified), and the same log-probabilities."""
    g = torch.Generator().manual_seed(21)
    z = torch.round(2.0 * torch.randn(2, 3, 20000, generator=g, dtype=torch.float64)).to(dtype)
    w = (z.to(torch.float64) + 0.1 * torch.randn(2, 3, 20000, generator=g, dtype=torch.float64)).to(dtype)
    z[0, 1, ::3] = -math.inf
    w[0, 1, ::3] = -math.inf
    tokens = torch.randint(0, 20000, (2, 3), generator=g)
    tokens[0, 1] = 1  # unmasked
    assert _ops.use_cuda(z.cuda())
    for k in (1, 20, 300):
        for slots in ("k_plus_1", "exactly_k"):
            ref = trmath.topk_logprobs(z, w, k, tokens, slots=slots)
            got = trmath.topk_logprobs(z.cuda(), w.cuda(), k, tokens.cuda(), slots=slots)
            _assert_same_ids(got[0], ref[0], f"topk_logprobs k={k} {slots}")
            for a, b in zip(got[1:], ref[1:]):
                assert a.device.type == "cuda" and a.dtype == b.dtype
                _assert_close(a, b, TOL[dtype], f"topk_logprobs log-probs k={k} {slots}")
