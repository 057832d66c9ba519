"""Deterministic accuracy sweeps of the exact reductions against mpmath (TARGETS.md, accuracy).

Every public function of :mod:`trmath.exact` (``kl``, ``tv``, ``js``, ``logsumexp``,
``entropy``, ``token_logprobs`` with and without ``return_entropy``) is evaluated on every input
dtype over fixed families of rows, and compared with the 50-digit oracles of
:mod:`trmath.testing.oracles` applied to the values *after* the cast to the dtype (the exact
distributions the inputs represent):

* ``random``       unrelated rows, normal and wide (logit spread of a few thousand);
* ``near``         near-identical rows (KL from ~1e-4 down to ~1e-12 and below), by noise or by
                   moving a few logits one unit in the last place;
* ``near_offset``  the same with a constant logit offset between the two rows (and one row whose
                   offset is exact: the same distribution, every divergence exactly 0);
* ``peaked``       one logit far above the rest (spreads 20, 80, 1e4), peak kept, moved or lowered;
* ``masked``       ``-inf`` tokens in p, in q, in both, disjoint supports; ``q_i = 0 < p_i`` gives
                   ``KL = +inf`` exactly while TV and JS stay finite;
* ``logprobs``     log-probabilities passed as logits (``logsumexp`` close to 0, the hard case);

at V = 1, 2, 3, 7, 64, 1000; at temperatures 0.5, 0.7 and 2.0; and on a few rows at V = 32769
(across the 16384-element segment boundary) and V = 262144 (slow).

Failures list the worst rows (value, reference, errors, and a description of the input rows).
"""

from __future__ import annotations

import hashlib
import math
import zlib

import numpy as np
import pytest
import torch

import trmath
from trmath.testing import StableRNG, adversarial_batch, assert_close_to_reference, cast, max_relative_error, mp_batch

# ------------------------------------------------------------------------------------------------
# The tolerance table (TARGETS.md): |err| <= rtol * |value| + atol against the oracle. No widening.
# ------------------------------------------------------------------------------------------------
TOL: dict[torch.dtype, tuple[float, float]] = {
    torch.float16: (1e-5, 1e-30),
    torch.bfloat16: (1e-5, 1e-30),
    torch.float32: (1e-5, 1e-30),
    torch.float64: (1e-12, 1e-300),
}

DTYPES = tuple(TOL)
SIZES = (1, 2, 3, 7, 64, 1000)
FAMILIES = ("random", "near", "near_offset", "peaked", "masked", "logprobs")
FUNCS = ("kl", "tv", "js", "logsumexp", "entropy", "token_logprobs", "token_logprobs+entropy")
PAIR_FUNCS = ("kl", "tv", "js")
TEMPERATURES = (0.5, 0.7, 2.0)

INF = math.inf


def _dname(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _seed(*parts: object) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


def _as64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


def _ulp_moves(zc: torch.Tensor, idx: np.ndarray, up: np.ndarray) -> torch.Tensor:
    """``zc`` with the entries ``idx`` moved one unit in the last place (of zc's dtype)."""
    w = zc.clone()
    if idx.size == 0:
        return w
    ii = torch.from_numpy(idx)
    target = torch.where(torch.from_numpy(up), torch.tensor(INF), torch.tensor(-INF)).to(zc.dtype)
    w[ii] = torch.nextafter(zc[ii], target)
    return w


def _keep_one(mask: np.ndarray, rng: StableRNG) -> np.ndarray:
    if mask.all():
        mask = mask.copy()
        mask[rng.integers(0, mask.size)] = False
    return mask


# ------------------------------------------------------------------------------------------------
# input families: (z, w) rows, cast to the dtype first; derived rows start from the cast values
# ------------------------------------------------------------------------------------------------
def _pair(family: str, V: int, dtype: torch.dtype, i: int, rng: StableRNG):
    """The i-th pair of a family: two 1-D tensors of ``dtype``."""
    low = dtype in (torch.float16, torch.bfloat16)
    if family == "random":
        kind = i % 4
        if kind == 0:
            z, w = rng.normal(V), rng.normal(V)
        elif kind == 1:
            z, w = 4.0 * rng.normal(V) - 5.0, 0.5 * rng.normal(V) + 20.0
        elif kind == 2:  # wide rows: logit spread of a few thousand
            z, w = 300.0 * rng.normal(V), 30.0 * rng.normal(V)
        else:
            z, w = 2.0 * rng.normal(V), 2.0 * rng.normal(V) - 100.0
        return cast(z, dtype), cast(w, dtype)

    if family == "near":
        scale = (1.0, 4.0, 0.25)[i % 3]
        zc = cast(scale * rng.normal(V), dtype)
        z64 = _as64(zc)
        kind = i % 8
        if kind in (0, 1, 2, 6, 7):
            sigma = {0: 1e-2, 1: 1e-4, 2: 1e-6, 6: 1e-7, 7: 1e-3}[kind]
            if low and sigma < 1e-2:
                sigma = 1e-2 if kind != 7 else 3e-2  # smaller noise would round away entirely
            return zc, cast(z64 + sigma * rng.normal(V), dtype)
        if kind == 3:  # one logit one ulp away
            return zc, _ulp_moves(zc, np.array([rng.integers(0, V)]), np.array([True]))
        if kind == 4:  # a few logits one ulp away, both directions
            idx = np.unique(rng.integers(0, V, min(V, 3)))
            return zc, _ulp_moves(zc, idx, rng.uniform(idx.size) < 0.5)
        # every logit one ulp up (not a constant shift: the ulps differ)
        return zc, _ulp_moves(zc, np.arange(V), np.ones(V, dtype=bool))

    if family == "near_offset":
        kind = i % 5
        if kind == 4:  # an exact offset: the same distribution, every divergence exactly 0
            zq = np.round(8.0 * np.clip(rng.normal(V), -3.0, 3.0)) / 8.0
            return cast(zq, dtype), cast(zq + 4.0, dtype)
        scale = (1.0, 4.0)[i % 2]
        zc = cast(scale * rng.normal(V), dtype)
        z64 = _as64(zc)
        if low:
            c = (2.0, -4.0, 0.5, 1.0)[kind]
            return zc, cast(z64 + c, dtype)  # the rounding of z + c is the perturbation
        c = (3.0, -1000.0, 64.0, 0.5)[kind]
        sigma = (0.0, 1e-6, 1e-4, 1e-7)[kind]
        return zc, cast(z64 + c + sigma * rng.normal(V), dtype)

    if family == "peaked":
        spread = (20.0, 80.0, 1e4)[(i + i // 4) % 3]
        mode = i % 4
        z = rng.normal(V)
        k = rng.integers(0, V)
        z[k] += spread
        zc = cast(z, dtype)
        z64 = _as64(zc)
        if mode == 0:
            w = z64 + (3e-2 if low else 1e-3) * rng.normal(V)
        elif mode == 1 and V > 1:  # the peak moved to another token
            w = z64.copy()
            j = (k + 1 + rng.integers(0, V - 1)) % V
            w[j], w[k] = w[k], w[j]
        elif mode == 2:  # the peak lowered by half its height
            w = z64.copy()
            w[k] -= spread / 2
        else:  # an offset plus a one-ulp move of the peak
            return zc, _ulp_moves(cast(z64 + 0.5, dtype), np.array([k]), np.array([False]))
        return zc, cast(w, dtype)

    if family == "masked":
        z = (1.0, 3.0)[i % 2] * rng.normal(V)
        w = z + 1e-3 * rng.normal(V) if i % 3 != 2 else 2.0 * rng.normal(V)
        mode = i % 6
        if V > 1:
            if mode == 0:  # the same tokens masked in both
                m = _keep_one(rng.uniform(V) < 0.5, rng)
                z[m] = -INF
                w[m] = -INF
            elif mode == 1:  # p_i = 0 < q_i: finite KL
                z[_keep_one(rng.uniform(V) < 0.3, rng)] = -INF
            elif mode == 2:  # q_i = 0 < p_i: KL = +inf, TV and JS finite
                w[_keep_one(rng.uniform(V) < 0.3, rng)] = -INF
            elif mode == 3:  # independent masks
                z[_keep_one(rng.uniform(V) < 0.4, rng)] = -INF
                w[_keep_one(rng.uniform(V) < 0.4, rng)] = -INF
            elif mode == 4:  # disjoint supports: TV = 1, JS = log 2, KL = +inf
                k = rng.integers(0, V)
                z[:] = -INF
                z[k] = 1.5
                w[k] = -INF
            else:  # all but one token masked in p; q keeps them (KL = -log q_k)
                k = rng.integers(0, V)
                keep = z[k]
                z[:] = -INF
                z[k] = keep
        return cast(z, dtype), cast(w, dtype)

    if family == "logprobs":
        scale = (1.0, 4.0, 0.25, 1.0)[i % 4]
        x = scale * rng.normal(V)
        if i % 4 == 3:
            x[rng.integers(0, V)] += 30.0  # log p_max = -1e-13 or so
        sigma = (1e-3, 1e-2, 1.0)[i % 3]
        y = x + sigma * rng.normal(V)
        lz = torch.log_softmax(torch.from_numpy(x), -1).numpy()
        lw = torch.log_softmax(torch.from_numpy(y), -1).numpy()
        return cast(lz, dtype), cast(lw, dtype)

    raise ValueError(family)


def family_batch(family: str, V: int, dtype: torch.dtype, n: int):
    """``(z, w, tokens)``: ``[n, V]`` pairs of a family, and a token per row of ``cat(z, w)``."""
    root = StableRNG(_seed(family, V, _dname(dtype)))
    pairs = [_pair(family, V, dtype, i, root.spawn(i)) for i in range(n)]
    z = torch.stack([p[0] for p in pairs])
    w = torch.stack([p[1] for p in pairs])
    rows = _as64(torch.cat([z, w]))
    trng = root.spawn(10**6)
    tokens = []
    for r, row in enumerate(rows):
        fin = np.flatnonzero(np.isfinite(row))
        masked = np.flatnonzero(~np.isfinite(row))
        kind = r % 3
        if kind == 0:
            tokens.append(int(np.argmax(row)))
        elif kind == 2 and masked.size:  # a masked token: log-probability -inf
            tokens.append(int(masked[trng.integers(0, masked.size)]))
        else:
            tokens.append(int(fin[trng.integers(0, fin.size)]))
    return z, w, torch.tensor(tokens, dtype=torch.int64)


def rows_per_family(V: int) -> int:
    return 8 if V <= 64 else 3


_ORACLE_CACHE: dict[tuple, np.ndarray] = {}


def oracle(name: str, *arrays: torch.Tensor, tokens=None, temperature: float = 1.0) -> np.ndarray:
    """``mp_batch`` memoised on the exact input values (rows are shared between tests)."""
    h = hashlib.sha1()
    for a in arrays:
        h.update(str(a.dtype).encode() + str(tuple(a.shape)).encode())
        h.update(_as64(a).tobytes())
    if tokens is not None:
        h.update(tokens.numpy().astype(np.int64).tobytes())
    key = (name, float(temperature), h.hexdigest())
    if key not in _ORACLE_CACHE:
        _ORACLE_CACHE[key] = mp_batch(name, *arrays, tokens=tokens, temperature=temperature)
    return _ORACLE_CACHE[key]


# ------------------------------------------------------------------------------------------------
# checking
# ------------------------------------------------------------------------------------------------
def check(func: str, z: torch.Tensor, w: torch.Tensor, tokens: torch.Tensor, dtype, T: float,
          label: str) -> list[str]:
    """Compare ``func`` with the oracle; returns the failure messages (empty when it passes)."""
    rtol, atol = TOL[dtype]
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    failures = []
    if func in PAIR_FUNCS:
        got = {func: getattr(trmath, func)(z, w, temperature=T)}
        refs = {func: oracle(func, z, w, temperature=T)}
        inputs = (z, w)
    else:
        x = torch.cat([z, w])
        if func in ("logsumexp", "entropy"):
            got = {func: getattr(trmath, func)(x, temperature=T)}
            refs = {func: oracle(func, x, temperature=T)}
        else:
            res = trmath.token_logprobs(x, tokens, temperature=T,
                                        return_entropy=func.endswith("entropy"))
            lp, h = res if isinstance(res, tuple) else (res, None)
            got = {"token_logprobs": lp}
            refs = {"token_logprobs": oracle("token_logprobs", x, tokens=tokens, temperature=T)}
            if h is not None:
                got["entropy (return_entropy)"] = h
                refs["entropy (return_entropy)"] = oracle("entropy", x, temperature=T)
        inputs = {"logits": x}
    lead = tuple(z.shape[:-1]) if func in PAIR_FUNCS else tuple(inputs["logits"].shape[:-1])
    for name, val in got.items():
        if val.dtype != out_dtype or tuple(val.shape) != lead:
            failures.append(f"{name} {label}: result {val.dtype} {tuple(val.shape)}, "
                            f"expected {out_dtype} {lead}")
            continue
        try:
            assert_close_to_reference(val, refs[name], rtol=rtol, atol=atol, inputs=inputs,
                                      name=f"{name} {label}")
        except AssertionError as exc:
            failures.append(str(exc))
    return failures


def raise_failures(failures: list[str]) -> None:
    if failures:
        raise AssertionError("\n".join(failures))


# ------------------------------------------------------------------------------------------------
# the sweeps
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=_dname)
@pytest.mark.parametrize("func", FUNCS)
@pytest.mark.parametrize("family", FAMILIES)
def test_family_sweep(family, func, dtype):
    """Every family, at every V of SIZES, temperature 1."""
    failures = []
    for V in SIZES:
        z, w, tokens = family_batch(family, V, dtype, rows_per_family(V))
        failures += check(func, z, w, tokens, dtype, 1.0, f"[{_dname(dtype)} {family} V={V}]")
    raise_failures(failures)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dname)
@pytest.mark.parametrize("func", FUNCS[3:])
def test_single_rows_either_side_of_the_short_row_length(func, dtype):
    """The single-row reductions sum a row of up to 4096 logits (512 in float64) in two passes
    from cache (its maximum, then its sums about it) and a longer one in one read with per-lane
    maxima: every family at the lengths either side of the switch (the shorter one with a
    partial vector at its end), at temperatures 1 and 0.7."""
    failures = []
    for V in ((511, 512, 513) if dtype == torch.float64 else (4095, 4096, 4097)):
        parts = [family_batch(f, V, dtype, 2) for f in FAMILIES]
        z = torch.cat([p[0] for p in parts])
        w = torch.cat([p[1] for p in parts])
        tokens = torch.cat([p[2][:2] for p in parts] + [p[2][2:] for p in parts])
        for T in (1.0, 0.7):
            failures += check(func, z, w, tokens, dtype, T, f"[{_dname(dtype)} V={V} T={T}]")
    raise_failures(failures)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dname)
@pytest.mark.parametrize("func", FUNCS)
@pytest.mark.parametrize("T", TEMPERATURES)
def test_temperature_sweep(T, func, dtype):
    """A mix of every family at temperatures != 1 (the rollout's sampling temperature)."""
    failures = []
    for V in (3, 64):
        parts = [family_batch(f, V, dtype, 4) for f in FAMILIES]
        z = torch.cat([p[0] for p in parts])
        w = torch.cat([p[1] for p in parts])
        n = z.shape[0]
        tokens = torch.cat([p[2][:4] for p in parts] + [p[2][4:] for p in parts])
        assert tokens.shape == (2 * n,)
        failures += check(func, z, w, tokens, dtype, T, f"[{_dname(dtype)} T={T} V={V}]")
    raise_failures(failures)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dname)
@pytest.mark.parametrize("func", PAIR_FUNCS)
def test_log_ratios_in_bands_around_the_series_radii(func, dtype):
    """Rows whose log-ratios all lie in one band around 1/2 or 1 in magnitude, where the kernels
    switch between series and closed forms (the float lanes' series cover |x| < 1, the double
    lanes' JS series |x| < 1/2): every vector of the row then takes one branch, or a mix of
    both, across the switch."""
    rng = StableRNG(_seed("bands", func, dtype))
    failures = []
    for lo, hi in ((0.3, 0.7), (0.45, 0.55), (0.6, 0.99), (0.9, 1.1), (0.99, 1.01), (1.0, 1.6)):
        for V in (64, 1000):
            z = rng.normal(6 * V).reshape(6, V) * 2.0
            mag = rng.uniform(6 * V, lo, hi).reshape(6, V)
            sign = np.where(rng.uniform(6 * V) < 0.5, -1.0, 1.0)
            w = z - sign.reshape(6, V) * mag
            zc, wc = cast(z, dtype), cast(w, dtype)
            tokens = torch.zeros(12, dtype=torch.int64)
            failures += check(func, zc, wc, tokens, dtype, 1.0,
                              f"[{_dname(dtype)} |x| in ({lo}, {hi}) V={V}]")
    raise_failures(failures)


def test_masked_kl_is_exactly_inf_and_tv_js_finite():
    """``q_i = 0 < p_i``: KL is +inf exactly, TV and JS finite and correct, in every dtype."""
    z64 = np.array([[0.5, -1.0, 2.0, -INF], [0.0, 0.0, 0.0, 0.0], [3.0, -INF, -INF, -INF]])
    w64 = np.array([[0.5, -INF, 2.0, 1.0], [-INF, 0.0, 0.0, 0.0], [-INF, 1.0, -INF, -INF]])
    for dtype in DTYPES:
        z, w = cast(z64, dtype), cast(w64, dtype)
        k = trmath.kl(z, w)
        assert torch.equal(k, torch.full_like(k, INF)), (dtype, k)
        for f in ("tv", "js"):
            v = getattr(trmath, f)(z, w)
            assert torch.isfinite(v).all(), (f, dtype, v)
            rtol, atol = TOL[dtype]
            assert_close_to_reference(v, mp_batch(f, z, w), rtol=rtol, atol=atol,
                                      inputs=(z, w), name=f"{f} {_dname(dtype)}")
        # disjoint supports (row 2): TV = 1 and JS = log 2 to the tolerance
        assert abs(float(trmath.tv(z, w)[2]) - 1.0) <= TOL[dtype][0]
        assert abs(float(trmath.js(z, w)[2]) - math.log(2.0)) <= TOL[dtype][0] * math.log(2.0)


def test_exact_offset_gives_exact_zero():
    """Rows equal up to an exactly representable offset: KL, TV, JS are 0 (the oracle's 0)."""
    base = np.array([[0.25, -1.5, 3.0, 0.0, -INF], [7.0, 7.0, 7.0, 7.0, 7.0]])
    for dtype in DTYPES:
        z, w = cast(base, dtype), cast(base - 2.0, dtype)
        for f in PAIR_FUNCS:
            for T in (1.0, 0.7):
                v = getattr(trmath, f)(z, w, temperature=T)
                assert (v.abs() <= TOL[dtype][1]).all(), (f, dtype, T, v)


# ------------------------------------------------------------------------------------------------
# large vocabularies: across the 16384-element segment boundary, and V = 262144
# ------------------------------------------------------------------------------------------------
def _large_rows(V: int, dtype: torch.dtype):
    """Three pairs at vocabulary V, with the interesting entries on the segment edges.

    The first three pairs hold multiples of 1/8 (exact in every dtype, also after the offset
    below) so that the oracle, which exponentiates each distinct value once, stays cheap.

    * near-identical: ``w = z + 0.5`` (an exact offset) with five logits one ulp away, at
      indices 0, 16383, 16384, 32768 and V - 1;
    * masked: a block of ``-inf`` across index 16384 in p, and ``q_{V-1} = 0 < p_{V-1}``
      (KL = +inf exactly);
    * peaked: a peak of height 1e4 on the last token, lowered by 0.5 in q;
    * dense near-identical: ``w = z + 1e-3 noise``, every value distinct.
    """
    rng = StableRNG(_seed("large", V, _dname(dtype)))
    base = np.clip(np.round(8.0 * 1.5 * rng.normal(V)) / 8.0, -9.0, 9.0)
    edges = np.array(sorted({0, 16383, 16384, min(32768, V - 1), V - 1}))
    z1 = cast(base, dtype)
    w1 = _ulp_moves(cast(base + 0.5, dtype), edges, np.arange(edges.size) % 2 == 0)
    z2, w2 = base.copy(), base + 0.25
    z2[16380:16390] = -INF
    w2[16386:16400] = -INF
    w2[V - 1] = -INF
    z3 = base.copy()
    z3[V - 1] += 1e4
    w3 = z3.copy()
    w3[V - 1] -= 0.5
    # a dense near-identical pair with unrounded noise (every value distinct)
    z4 = cast(1.5 * rng.normal(V), dtype)
    w4 = cast(_as64(z4) + 1e-3 * rng.normal(V), dtype)
    z = torch.stack([z1, cast(z2, dtype), cast(z3, dtype), z4])
    w = torch.stack([w1, cast(w2, dtype), cast(w3, dtype), w4])
    tokens = torch.tensor([V - 1, 16384, 16385, 7, 0, V - 1, 16383, 16384], dtype=torch.int64)
    return z, w, tokens


def _sparse_rows(V: int, dtype: torch.dtype):
    """Pairs over a large vocabulary of which about 2% is unmasked, spread over every segment.

    The kernels still read all V logits; the oracle only works on the unmasked ones (TV and JS
    oracles cost one multiple-precision operation per element, too slow on dense rows of 262144).
    """
    rng = StableRNG(_seed("sparse", V, _dname(dtype)))
    z = np.full(V, -INF)
    w = np.full(V, -INF)
    keep = np.unique(np.concatenate([rng.integers(0, V, V // 50), [0, 16383, 16384, V - 1]]))
    z[keep] = 2.0 * rng.normal(keep.size)
    zc = cast(z, dtype)
    w[keep] = _as64(zc)[keep] + 1e-2 * rng.normal(keep.size)
    w[keep[::7]] = -INF  # q_i = 0 < p_i: KL = +inf, TV and JS finite
    w2 = _as64(zc).copy()
    w2[keep[1::5]] += 1.0
    return torch.stack([zc, zc]), torch.stack([cast(w, dtype), cast(w2, dtype)])


@pytest.mark.parametrize("dtype", DTYPES, ids=_dname)
def test_across_segment_boundary(dtype):
    """V = 32769: two full segments and one element (segment-parallel, N < 4 threads).

    Dense rows for KL and the single-row reductions; TV and JS on sparse rows (their oracles
    cost one multiple-precision operation per element; dense near-identical rows below).
    """
    V = 32769
    z, w, tokens = _large_rows(V, dtype)
    failures = []
    for func in ("kl",) + FUNCS[3:]:
        failures += check(func, z, w, tokens, dtype, 1.0, f"[{_dname(dtype)} V={V} dense]")
    zs, ws = _sparse_rows(V, dtype)
    for func in PAIR_FUNCS:
        failures += check(func, zs, ws, None, dtype, 1.0, f"[{_dname(dtype)} V={V} sparse]")
    raise_failures(failures)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dname)
@pytest.mark.parametrize("T", (1.0, 0.7))
def test_rising_rows_single_reductions(dtype, T):
    """Rows whose logits rise (sorted, as after a sort by value): a long segment's one-read pass
    moves its lane maxima on every vector until, after kOnlineMoves moves, every lane moves once
    to the maximum of the rest of the segment. Rising rows (plain, with a masked block, with a
    peak in the middle of the first segment, falling after a rise) across two segments, against
    the oracle. Values are multiples of 1/8 (exact in every dtype; the oracle exponentiates each
    distinct value once)."""
    V = 20000
    rng = StableRNG(_seed("rising", V, _dname(dtype)))
    base = np.sort(np.clip(np.round(8.0 * 2.0 * rng.normal(V)) / 8.0, -12.0, 12.0))
    rows = [base.copy() for _ in range(4)]
    rows[1][3000:3100] = -INF  # a masked block after the switch
    rows[2][9000] = 30.0  # the segment's maximum in the middle of its rise
    rows[3][16384:] = base[16384:][::-1]  # the second segment falls
    z = torch.stack([cast(r, dtype) for r in rows])
    w = z.flip(0)
    tokens = torch.tensor([V - 1, 3050 - 1, 9000, 16384, 0, 17000, 12, 19999], dtype=torch.int64)
    failures = []
    for func in FUNCS[3:]:
        failures += check(func, z, w, tokens, dtype, T, f"[{_dname(dtype)} rising V={V} T={T}]")
    raise_failures(failures)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32, torch.float64), ids=_dname)
def test_rising_rows_report_nan_and_inf_after_the_switch(dtype):
    """A NaN or +inf late in a rising row (after the lanes moved to the rest's maximum, which
    skips NaN) is still reported: ValueError naming the row, or NaN with validate=False."""
    V = 16384
    z = torch.arange(V, dtype=torch.float64).div(64.0).expand(3, V).clone()
    z[1, 12000] = math.nan
    z[2, 12000] = INF
    z = z.to(dtype)
    for fn in (trmath.logsumexp, trmath.entropy):
        for r, what in ((1, "NaN"), (2, r"\+inf")):
            with pytest.raises(ValueError, match=f"row 1 contains {what}"):
                fn(z[[0, r]])
        out = fn(z, validate=False)
        assert bool(torch.isfinite(out[0])) and bool(torch.isnan(out[1:]).all())


def test_logsumexp_of_log_probabilities_summing_to_one_within_1e_26():
    """float64 log-probabilities whose probabilities sum to 1 - delta with delta down to
    1e-26, reached as a deep cancellation (1 - p_max ~ 1e-9 against the other tokens' mass
    ~ 1e-9): logsumexp ~ -delta to 1e-12 relative. The double-double pass once summed
    exp(z - M) next to the maximum's exact 1, which kept the others' mass to ~1e-32 of 1 only
    (2e-8 relative here); now the maxima are counted apart and log1p takes the rest."""
    rows = []
    for eps, split in ((1.0865725966288572e-09, 1), (3e-7, 1), (2e-5, 3), (1e-12, 2), (0.25, 4)):
        top = -eps  # log p_max, then the other tokens share 1 - e^top (rounded in their logs)
        rest = math.log(-math.expm1(top) / split)
        row = [top] + [rest] * split
        row += [-INF] * (6 - len(row))
        rows.append(row)
    rows.append([math.log(0.5), math.log(0.5), -INF, -INF, -INF, -INF])  # two maxima
    z = torch.tensor(rows, dtype=torch.float64)
    tokens = torch.zeros(2 * z.shape[0], dtype=torch.int64)  # check() stacks z and w
    failures = []
    for func in ("logsumexp", "token_logprobs"):
        failures += check(func, z, z, tokens, torch.float64, 1.0, "[float64 log-probabilities]")
    raise_failures(failures)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32), ids=_dname)
def test_divergences_at_the_bottom_of_float_range_stay_non_negative(dtype):
    """Two near point masses on the same token, the rest of each row at probabilities near
    float's smallest normal: JS ~ 1e-37, where the float terms round with absolute errors of
    that size and could sum below 0 (184 of these 450 rows, 150 per dtype, came back negative
    before the finish clamped JS at 0, as KL and TV already were). Every divergence >= 0, and
    each within the accuracy target (whose absolute floor, 1e-30, covers such values) of the
    oracle."""
    zs, ws, Ts = [], [], []
    for seed in range(30):
        g = torch.Generator().manual_seed(seed)
        V = (3, 32, 256)[seed % 3]
        z = torch.randn(1, V, generator=g, dtype=torch.float64)
        k = seed % V
        for a, d, T in ((100.0, 50.0, 1.125), (1000.0, 504.0, 12.0), (80.0, 40.0, 0.9),
                        (60.0, 30.0, 0.7), (400.0, 300.0, 4.5)):
            zz, ww = z.clone(), z.clone()
            zz[0, k], ww[0, k] = a, a + d
            zs.append(zz.to(dtype)), ws.append(ww.to(dtype)), Ts.append(T)
    for z, w, T in zip(zs, ws, Ts):
        for fn in (trmath.kl, trmath.tv, trmath.js):
            v = fn(z, w, temperature=T)
            assert bool((v >= 0).all()), (fn.__name__, T, float(v))
    failures = []
    for i in range(0, len(zs), 7):  # a sample against the oracle (its cost grows with V)
        tok = torch.zeros(1, dtype=torch.int64)
        for func in ("kl", "tv", "js"):
            failures += check(func, zs[i], ws[i], tok, dtype, Ts[i], f"[{_dname(dtype)} case {i}]")
    raise_failures(failures)


@pytest.mark.parametrize(
    "dtype",
    [torch.bfloat16, pytest.param(torch.float32, marks=pytest.mark.slow),
     pytest.param(torch.float64, marks=pytest.mark.slow)],  # ~10 s of oracle time each
    ids=_dname,
)
def test_across_segment_boundary_dense_tv_js(dtype):
    """TV and JS of dense near-identical rows at V = 32769 (partial sums of every segment)."""
    V = 32769
    z, w, tokens = _large_rows(V, dtype)
    z, w = z[:1], w[:1]  # the near-identical pair with ulp moves on the segment edges
    failures = []
    for func in ("tv", "js"):
        failures += check(func, z, w, tokens, dtype, 1.0, f"[{_dname(dtype)} V={V} dense]")
    raise_failures(failures)


# Peaked pairs (float32 at T = 1/16, float64 at T = 1/2) whose TV is set by tiny tails.
_TV_Z1 = [
    7.233269214630127, -8.504182815551758, 19.38880157470703, 11.579718589782715,
    12.708908081054688, 11.572864532470703, 48.6992301940918, -44.28433609008789,
    52.25326156616211, 12.687541961669922, -18.54993438720703, 5.261355400085449,
    15.757564544677734, 22.764522552490234, 5.269659519195557, 8.656760215759277,
    -43.474143981933594
]
_TV_W1 = [
    9.801434516906738, 5.490525722503662, -0.29743847250938416, -18.788114547729492,
    -11.702593803405762, -4.673118591308594, -15.091659545898438, -21.618026733398438,
    15.01118278503418, 12.368464469909668, 7.026387691497803, 9.776002883911133,
    -11.185566902160645, 4.503543376922607, -10.537357330322266, -4.968324184417725,
    -6.164202690124512
]
_TV_Z2 = [
    21.822058992764504, 105.52943291755135, -24.654829983483495, -35.812437469454395,
    -88.01135287649187
]
_TV_W2 = [
    -42.35367237475067, 38.72010727677111, 2.2869265592499133, -87.80609373585895,
    -119.60027176264009
]

# Rows that other tests (Hypothesis, parity) found failing, checked here against the oracle:
# (function, dtype, z, w, temperature, what happened)
PINNED = [
    ("tv", torch.float32, [-1.8968006372451782, 0.352798193693161],
     [-4.8956427574157715, -2.646737813949585], 0.0625, "TV = 2.6e-18 came out as 0.0"),
    ("tv", torch.float32, [-4.8956427574157715, -2.646737813949585],
     [-1.8968006372451782, 0.352798193693161], 0.0625, "(the same pair, other order)"),
    ("tv", torch.float32, _TV_Z1, _TV_W1, 0.0625, "TV = 4.33e-19 came out as 2.0e-25"),
    ("tv", torch.float32, _TV_W1, _TV_Z1, 0.0625, "(the same pair, other order)"),
    ("tv", torch.float64, _TV_Z2, _TV_W2, 0.5, "TV = 2.26e-32 came out as 0 in one order"),
    ("tv", torch.float64, _TV_W2, _TV_Z2, 0.5, "(the same pair, other order)"),
]


@pytest.mark.parametrize("func, dtype, z, w, T, what", PINNED, ids=lambda v: None)
def test_pinned_rows(func, dtype, z, w, T, what):
    zt = torch.tensor([z], dtype=torch.float64).to(dtype)
    wt = torch.tensor([w], dtype=torch.float64).to(dtype)
    raise_failures(check(func, zt, wt, torch.tensor([0, 0]), dtype, T, f"[pinned: {what}]"))


def test_float64_kl_of_a_long_near_identical_row():
    """float64, V = 40000, ``w = z + 1e-3 noise`` (three segments, KL ~ 5e-7): 1e-12 relative.

    Pinned: the parity test against the torch backend found the C++ kernel off by 3e-12 here.
    """
    g = torch.Generator().manual_seed(4)
    z = 2.0 * torch.randn(1, 40000, generator=g, dtype=torch.float64)
    w = z + 1e-3 * torch.randn(1, 40000, generator=g, dtype=torch.float64)
    raise_failures(check("kl", z, w, torch.tensor([0, 1]), torch.float64, 1.0,
                         "[float64 V=40000 near]"))


def test_float64_kl_of_long_rows_equal_up_to_an_offset():
    """float64, V = 151936 (ten segments), an "offset" pair (w = z + c up to ulps): KL = 5.4e-28.

    The segments' centres (differences of their maxima) differ from the row's by ~1e-14 next to
    logits of size 10; a rounded difference of centres in the merge left this KL 63 % off
    (8.8e-28). Found by the GPU kernels' tests, which merge many more partials.
    """
    V = 151936
    _, z, w = adversarial_batch(12, V, 3 + V, torch.float64, pairs=True, allow_infinite_kl=False)
    raise_failures(check("kl", z[2:3], w[2:3], torch.tensor([0]), torch.float64, 1.0,
                         "[float64 V=151936 offset]"))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32), ids=_dname)
def test_vocabulary_262144(dtype):
    """V = 262144, the largest real vocabularies: dense rows (KL and the single-row reductions)
    and sparse rows (every divergence)."""
    V = 262144
    z, w, tokens = _large_rows(V, dtype)
    z, w, tokens = z[:3], w[:3], tokens[[0, 1, 2, 4, 5, 6]]  # the oracle-cheap pairs
    failures = []
    for func in ("kl",) + FUNCS[3:]:
        failures += check(func, z, w, tokens, dtype, 1.0, f"[{_dname(dtype)} V={V} dense]")
    zs, ws = _sparse_rows(V, dtype)
    for func in PAIR_FUNCS:
        failures += check(func, zs, ws, None, dtype, 1.0, f"[{_dname(dtype)} V={V} sparse]")
    raise_failures(failures)


# ------------------------------------------------------------------------------------------------
# the point of the library: the textbook float32 formula fails where trmath does not
# ------------------------------------------------------------------------------------------------
def _naive_kl(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    lp = torch.log_softmax(z, dim=-1)
    lq = torch.log_softmax(w, dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def test_naive_float32_formula_fails_on_near_identical_rows():
    dtype = torch.float32
    rtol, atol = TOL[dtype]
    for V in (64, 1000):
        z, w, _ = family_batch("near", V, dtype, 8)
        ref = mp_batch("kl", z, w)
        assert (ref > 0).all() and ref.min() < 1e-12  # the family reaches the 1e-12 regime
        naive = _naive_kl(z, w)
        # the textbook formula: relative errors of order 1 or more, wrong signs
        assert max_relative_error(naive, ref) > 0.1, naive
        assert (naive <= 0).any(), naive
        # trmath: within the target on every row
        assert_close_to_reference(trmath.kl(z, w), ref, rtol=rtol, atol=atol, inputs=(z, w),
                                  name="trmath.kl near-identical float32")


def _first_centre_c(z: torch.Tensor, w: torch.Tensor) -> np.ndarray:
    """B/A of the first pass at the centre m = max z - max w (temperature 1), in float64: the
    ratio the KL acceptance rule tests (rowfinish.hpp, pair_accept)."""
    z64, w64 = _as64(z), _as64(w)
    m = z64.max(-1, keepdims=True) - w64.max(-1, keepdims=True)
    q = np.exp(w64 - w64.max(-1, keepdims=True))
    x = z64 - w64 - m
    Q = q.sum(-1)
    Z1 = (q * np.expm1(x)).sum(-1) / Q
    phi = np.where(np.abs(x) < 1e-4, x * x / 2 + x**3 / 3, x * np.exp(x) - np.exp(x) + 1)
    A = (q * phi).sum(-1) / Q / (1 + Z1)
    B = np.log1p(Z1) - Z1 / (1 + Z1)
    with np.errstate(invalid="ignore", divide="ignore"):  # A = 0: identical rows (none here)
        return B / A


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64), ids=_dname)
def test_kl_rows_accepted_off_centre(dtype):
    """Rows whose first centre (a single token's log-ratio) is off by up to three spreads: the
    first pass is accepted up to B/A = 0.9 when the merges amplified little (pair_accept's
    error budget), and those rows still meet the target, at every spread of the log-ratios and
    across segments; rows beyond (B/A up to 0.9999, where KL = A - B would lose up to 13 bits)
    must be re-centred and meet it too."""
    rtol, atol = TOL[dtype]
    seen = far = 0
    for V in (3000, 20000):
        for spread in (1e-6, 1e-3, 0.3):
            rng = np.random.default_rng(_seed("off-centre", V, spread, str(dtype)))
            z64 = 2.0 * rng.standard_normal((48, V))
            w64 = z64 + spread * rng.standard_normal((48, V))
            # Half the rows: the token at the maximum (whose log-ratio is the first centre) moved
            # 3 to 30 spreads off, so that B/A reaches past 0.9.
            j = z64[24:].argmax(-1)
            k = rng.choice([-1.0, 1.0], 24) * rng.uniform(3.0, 30.0, 24)
            w64[np.arange(24, 48), j] = z64[np.arange(24, 48), j] - k * spread
            z, w = torch.from_numpy(z64).to(dtype), torch.from_numpy(w64).to(dtype)
            c = _first_centre_c(z, w)
            band = np.nonzero((c > 0.6) & (c <= 0.9))[0][:4]
            beyond = np.nonzero((c > 0.9) & (c <= 0.9999))[0][:3]
            if dtype != torch.float64 and spread == 1e-6:
                # a spread below the 16/32-bit resolution: rows are rounded apart
                band, beyond = band[:0], beyond[:0]
            seen += len(band)
            far += len(beyond)
            band = np.concatenate([band, beyond])
            if len(band) == 0:
                continue
            zb, wb = z[band], w[band]
            got = trmath.kl(zb, wb)
            assert_close_to_reference(got, oracle("kl", zb, wb), rtol=rtol, atol=atol,
                                      inputs=(zb, wb), name=f"kl off-centre V={V} spread={spread}")
    assert seen >= 8, f"only {seen} rows in the band 0.6 < B/A <= 0.9: the test exercises nothing"
    assert far >= 4, f"only {far} rows with 0.9 < B/A <= 0.9999"


@pytest.mark.parametrize("dtype", DTYPES, ids=_dname)
def test_pair_segments_centred_at_their_mean_log_ratio(dtype):
    """The pair reductions' first pass centres a segment of 2048 or more finite 16/32-bit logits
    at its mean z - w, not at the difference of its maxima, unless the two are more than 8 apart
    (in units of the temperature); the segment's sums are then moved to the row's centre. Rows at
    lengths either side of 2048 and across a segment boundary, at temperatures 1 and 0.7, whose
    mean is near, far from, or beyond 8 from the maxima's difference, and near-identical ones.
    Values are multiples of 1/64 (plus a few ulp moves), so the oracle stays cheap."""
    rtol, atol = TOL[dtype]
    failures = []
    for V in (2047, 2048, 5000, 16385):
        rng = StableRNG(_seed("mean-centre", V, _dname(dtype)))
        base = np.clip(np.round(64.0 * 3.0 * rng.normal(V)) / 64.0, -12.0, 12.0)
        noise = np.round(64.0 * 0.3 * rng.normal(V)) / 64.0
        zs, ws = [], []
        zs.append(base), ws.append(base + noise)                   # noise 0.3: the mean ~ 0
        w = base + noise
        w[: V // 3] -= 6.0                                          # a third of q moved down 6
        zs.append(base), ws.append(w)
        w = base.copy()
        w[::97] += 5.0                                              # sparse moves up
        zs.append(base), ws.append(w)
        w = base + noise
        w[V // 2] = 40.0                                            # maxima 28+ apart: fallback
        zs.append(base), ws.append(w)
        z = torch.stack([torch.as_tensor(cast(x, dtype)) for x in zs])
        w = torch.stack([torch.as_tensor(cast(x, dtype)) for x in ws])
        near = _ulp_moves(torch.as_tensor(cast(base + 7.5, dtype)),
                          np.array([0, 1, V // 2, V - 1]), np.array([True, False, True, False]))
        z = torch.cat([z, torch.as_tensor(cast(base, dtype))[None]])
        w = torch.cat([w, near[None]])
        for func in PAIR_FUNCS:
            for T in (1.0, 0.7):
                failures += check(func, z, w, None, dtype, T, f"[{_dname(dtype)} V={V} T={T}]")
    raise_failures(failures)
