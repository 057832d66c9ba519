"""Bad input to the exact reductions: every error names the argument and what is wrong.

Shapes, dtypes, types, token ids, empty vocabularies, invalid rows (NaN, ``+inf``, all ``-inf``)
and temperatures. With ``validate=False`` invalid rows come back as NaN -- never a finite
number, never ``+inf`` -- and the other rows are unaffected (bitwise).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

import trmath

INF = math.inf
NAN = math.nan
PAIR = ("kl", "tv", "js")
SINGLE = ("logsumexp", "entropy", "token_logprobs", "token_logprobs+entropy")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def single(func, x, tokens=None, **kw):
    """Call a single-row function; returns a tuple of outputs."""
    if func in ("logsumexp", "entropy"):
        return (getattr(trmath, func)(x, **kw),)
    if tokens is None:
        tokens = torch.zeros(x.shape[:-1], dtype=torch.int64)
    res = trmath.token_logprobs(x, tokens, return_entropy=func.endswith("entropy"), **kw)
    return res if isinstance(res, tuple) else (res,)


def m(text: str) -> str:
    return re.escape(text)


# ------------------------------------------------------------------------------------------------
# shapes, dtypes, types
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("func", PAIR)
def test_mismatched_vocabulary_sizes(func):
    with pytest.raises(ValueError, match=m("p_logits and q_logits") + ".*" + m("(3 vs 4)")):
        getattr(trmath, func)(torch.zeros(2, 3), torch.zeros(2, 4))


@pytest.mark.parametrize("func", PAIR)
def test_mismatched_shapes(func):
    with pytest.raises(ValueError, match=m("p_logits and q_logits") + ".*" + m("(2, 3) vs (3, 3)")):
        getattr(trmath, func)(torch.zeros(2, 3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="p_logits and q_logits"):
        getattr(trmath, func)(torch.zeros(2, 3, 5), torch.zeros(6, 5))
    with pytest.raises(ValueError, match="p_logits and q_logits"):
        getattr(trmath, func)(torch.zeros(5), torch.zeros(1, 5))  # no silent broadcasting


@pytest.mark.parametrize(
    "bad", (torch.int64, torch.int32, torch.bool, torch.complex64, torch.uint8))
@pytest.mark.parametrize("func", PAIR)
def test_pair_non_float_dtypes(func, bad):
    good = torch.zeros(2, 3)
    x = torch.zeros(2, 3, dtype=bad)
    with pytest.raises(TypeError, match="p_logits.*floating"):
        getattr(trmath, func)(x, good)
    with pytest.raises(TypeError, match="q_logits.*floating"):
        getattr(trmath, func)(good, x)


@pytest.mark.parametrize("bad", (torch.int64, torch.int32, torch.bool, torch.complex128))
@pytest.mark.parametrize("func", SINGLE)
def test_single_non_float_dtypes(func, bad):
    with pytest.raises(TypeError, match="logits.*floating"):
        single(func, torch.zeros(2, 3, dtype=bad))


@pytest.mark.parametrize("func", PAIR + SINGLE)
def test_numpy_non_float_arrays(func):
    x = np.zeros((2, 3), dtype=np.int64)
    if func in PAIR:
        with pytest.raises(TypeError, match="p_logits.*floating"):
            getattr(trmath, func)(x, np.zeros((2, 3)))
        with pytest.raises(TypeError, match="q_logits.*floating"):
            getattr(trmath, func)(np.zeros((2, 3)), x)
    else:
        with pytest.raises(TypeError, match="logits.*floating"):
            single(func, x)


@pytest.mark.parametrize("bad", ([[0.0, 1.0]], 1.0, None, "logits", (0.0, 1.0)),
                         ids=("list", "float", "None", "str", "tuple"))
@pytest.mark.parametrize("func", PAIR + SINGLE)
def test_non_tensor_inputs(func, bad):
    if func in PAIR:
        with pytest.raises(TypeError, match="p_logits: expected a torch.Tensor or numpy.ndarray"):
            getattr(trmath, func)(bad, torch.zeros(1, 2))
        with pytest.raises(TypeError, match="q_logits: expected a torch.Tensor or numpy.ndarray"):
            getattr(trmath, func)(torch.zeros(1, 2), bad)
    else:
        with pytest.raises(TypeError, match="logits: expected a torch.Tensor or numpy.ndarray"):
            single(func, bad, tokens=torch.zeros(1, dtype=torch.int64))


@pytest.mark.parametrize("func", PAIR + SINGLE)
def test_empty_vocabulary(func):
    for shape in ((2, 0), (0,), (3, 1, 0)):
        if func in PAIR:
            with pytest.raises(ValueError, match="p_logits: the vocabulary axis .* is empty"):
                getattr(trmath, func)(torch.zeros(shape), torch.zeros(shape))
        else:
            with pytest.raises(ValueError, match="logits: the vocabulary axis .* is empty"):
                single(func, torch.zeros(shape))


@pytest.mark.parametrize("func", PAIR + SINGLE)
def test_zero_dimensional_input(func):
    with pytest.raises(ValueError, match=r"expected shape \[\.\.\., V\]"):
        if func in PAIR:
            getattr(trmath, func)(torch.tensor(0.0), torch.tensor(0.0))
        else:
            single(func, torch.tensor(0.0), tokens=torch.tensor(0))


# ------------------------------------------------------------------------------------------------
# tokens
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("func", ("token_logprobs", "token_logprobs+entropy"))
def test_token_out_of_range(func):
    x = torch.zeros(4, 5)
    with pytest.raises(ValueError, match=m("tokens: entry at row 2 is 5, outside [0, 5)")):
        single(func, x, torch.tensor([0, 4, 5, 9]))  # the first bad row is reported
    with pytest.raises(ValueError, match=m("tokens: entry at row 1 is -1, outside [0, 5)")):
        single(func, x, torch.tensor([0, -1, 2, -7]))
    with pytest.raises(ValueError, match=m("tokens: entry at row 3 is 1000000, outside [0, 5)")):
        single(func, x, torch.tensor([0, 1, 2, 10**6]))
    x3 = torch.zeros(2, 3, 5)
    with pytest.raises(ValueError, match=m("tokens: entry at row (1, 2) is 7, outside [0, 5)")):
        single(func, x3, torch.tensor([[0, 1, 2], [3, 4, 7]]))
    with pytest.raises(ValueError, match=m("tokens: entry at row (0, 1) is -2, outside [0, 5)")):
        single(func, x3, torch.tensor([[0, -2, 2], [3, 4, 0]], dtype=torch.int32))
    with pytest.raises(ValueError, match=m("tokens: entry at row 0 is 5, outside [0, 5)")):
        single(func, np.zeros((1, 5)), np.array([5]))  # numpy too


@pytest.mark.parametrize("func", ("token_logprobs", "token_logprobs+entropy"))
def test_tokens_out_of_range_ignored_only_without_validation_never_silently(func):
    """validate=False skips the check; the row is then NaN, never a number from another token."""
    x = torch.tensor([[0.0, 1.0, 2.0], [0.5, 0.5, 0.5]])
    out = single(func, x, torch.tensor([0, 3]), validate=False)
    assert torch.isfinite(out[0][0]), out
    assert torch.isnan(out[0][1]), ("out-of-range token without validation", out)


@pytest.mark.parametrize("func", ("token_logprobs", "token_logprobs+entropy"))
def test_tokens_wrong_shape_or_dtype(func):
    x = torch.zeros(4, 5)
    with pytest.raises(ValueError, match=m("tokens: expected shape (4,)") + ".*" + m("got (3,)")):
        single(func, x, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=m("tokens: expected shape (4,)") + ".*" + m("got (4, 1)")):
        single(func, x, torch.zeros(4, 1, dtype=torch.int64))
    with pytest.raises(ValueError, match=m("tokens: expected shape (2, 3)") + ".*" + m("got (6,)")):
        single(func, torch.zeros(2, 3, 5), torch.zeros(6, dtype=torch.int64))
    for bad in (torch.float32, torch.float64, torch.bool):
        with pytest.raises(TypeError, match="tokens: expected an integer dtype"):
            single(func, x, torch.zeros(4, dtype=bad))
    with pytest.raises(TypeError, match="tokens: expected an integer dtype"):
        single(func, x, torch.zeros(4, dtype=torch.complex64))
    with pytest.raises(TypeError, match="tokens: expected an integer"):
        single(func, x, [0, 1, 2, 3])
    with pytest.raises(TypeError, match="tokens: expected an integer dtype"):
        single(func, x, np.zeros(4, dtype=np.float32))
    # a single row takes a Python or numpy integer (as numpy indexing gives one), nothing else
    row = torch.arange(5.0)
    ref = single(func, row, torch.tensor(3))
    for tok in (3, np.int64(3), np.int32(3)):
        got = single(func, row, tok)
        assert all(torch.equal(a, b) for a, b in zip(got, ref)), (tok, got, ref)
    with pytest.raises(ValueError, match=m("tokens: expected shape (4,)") + ".*" + m("got ()")):
        single(func, x, 3)
    for bad in (True, 3.0):
        with pytest.raises(TypeError, match="tokens: expected an integer torch.Tensor or numpy array"):
            single(func, row, bad)


# ------------------------------------------------------------------------------------------------
# invalid rows: NaN, +inf, entirely -inf
# ------------------------------------------------------------------------------------------------
BAD_ROWS = {
    "NaN": ([0.0, NAN, 1.0, 2.0, -1.0], "contains NaN"),
    "NaN and -inf": ([NAN, -INF, 0.0, -INF, 1.0], "contains NaN"),
    "all NaN": ([NAN] * 5, "contains NaN"),
    "+inf": ([0.0, 1.0, INF, 2.0, -1.0], "contains \\+inf"),
    "+inf and -inf": ([INF, -INF, -INF, -INF, -INF], "contains \\+inf"),
    "all -inf": ([-INF] * 5, "is entirely -inf"),
}


def _batch_with_bad_rows(dtype, bad, rows, lead=(5,)):
    """Valid random rows, ``bad`` written into the given (flat) rows."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*lead, 5, generator=g, dtype=torch.float64)
    x[..., 3] = -INF  # a masked token in every valid row (q_3 = 0 = p_3: KL stays finite)
    flat = x.reshape(-1, 5)
    for r in rows:
        flat[r] = torch.tensor(bad, dtype=torch.float64)
    return x.to(dtype)


@pytest.mark.parametrize("kind", BAD_ROWS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("func", PAIR)
def test_pair_invalid_rows_raise_naming_argument_and_row(func, dtype, kind):
    bad, what = BAD_ROWS[kind]
    f = getattr(trmath, func)
    good = _batch_with_bad_rows(dtype, bad, [])
    x = _batch_with_bad_rows(dtype, bad, [3, 1, 4])  # the first bad row is 1
    with pytest.raises(ValueError, match=f"p_logits: row 1 {what}"):
        f(x, good)
    with pytest.raises(ValueError, match=f"q_logits: row 1 {what}"):
        f(good, x)
    x3 = _batch_with_bad_rows(dtype, bad, [5, 4], lead=(2, 3))  # flat 4 = (1, 1)
    good3 = _batch_with_bad_rows(dtype, bad, [], lead=(2, 3))
    with pytest.raises(ValueError, match=m("p_logits: row (1, 1) ") + what):
        f(x3, good3)
    with pytest.raises(ValueError, match=m("q_logits: row (1, 1) ") + what):
        f(good3, x3)
    # both invalid in the same row: one error, naming an argument and that row
    with pytest.raises(ValueError, match=r"(p|q)_logits: row 1 "):
        f(x, x)


@pytest.mark.parametrize("kind", BAD_ROWS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("func", SINGLE)
def test_single_invalid_rows_raise_naming_row(func, dtype, kind):
    bad, what = BAD_ROWS[kind]
    x = _batch_with_bad_rows(dtype, bad, [4, 2])
    with pytest.raises(ValueError, match=f"logits: row 2 {what}"):
        single(func, x)
    x3 = _batch_with_bad_rows(dtype, bad, [3, 5], lead=(2, 3))  # flat 3 = (1, 0)
    with pytest.raises(ValueError, match=m("logits: row (1, 0) ") + what):
        single(func, x3)


@pytest.mark.parametrize("kind", BAD_ROWS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_invalid_rows_without_validation_are_nan(dtype, kind):
    """validate=False: invalid rows give NaN (not a number, not +inf); valid rows unchanged."""
    bad, _ = BAD_ROWS[kind]
    bad_rows = [1, 4]
    x = _batch_with_bad_rows(dtype, bad, bad_rows)
    good = _batch_with_bad_rows(dtype, bad, [])
    w = _batch_with_bad_rows(dtype, bad, [])
    w[..., 0] = -INF  # q_0 = 0 < p_0 in every row: a valid row's KL would be +inf
    w2 = good.flip(-1)
    valid = [r for r in range(5) if r not in bad_rows]
    for func in PAIR:
        f = getattr(trmath, func)
        for args, ref_args in (((x, w2), (good, w2)), ((w2, x), (w2, good)),
                               ((x, w), (good, w)), ((w, x), (w, good))):
            out = f(*args, validate=False)
            ref = f(*ref_args)
            assert torch.isnan(out[bad_rows]).all(), (func, kind, out)
            assert torch.equal(out[valid], ref[valid]), (func, kind, out, ref)
        out = f(x, x, validate=False)
        assert torch.isnan(out[bad_rows]).all(), (func, kind, "both", out)
    tokens = torch.tensor([0, 1, 2, 4, 0])
    for func in SINGLE:
        outs = single(func, x, tokens, validate=False)
        refs = single(func, good, tokens)
        for o, r in zip(outs, refs):
            assert torch.isnan(o[bad_rows]).all(), (func, kind, o)
            assert torch.equal(o[valid], r[valid]), (func, kind, o, r)


def test_nan_in_p_with_masked_q_is_not_reported_as_infinite_kl():
    """A NaN row in p where q has a masked token must not turn into KL = +inf."""
    z = torch.tensor([[0.0, NAN, 1.0], [0.0, 1.0, 2.0]])
    w = torch.tensor([[0.0, 1.0, -INF], [0.0, 1.0, 2.0]])
    with pytest.raises(ValueError, match="p_logits: row 0 contains NaN"):
        trmath.kl(z, w)
    out = trmath.kl(z, w, validate=False)
    assert torch.isnan(out[0]), out
    assert out[1] == 0, out


# ------------------------------------------------------------------------------------------------
# temperature
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", (0, 0.0, -1.0, -1e-300, NAN, INF, -INF), ids=repr)
@pytest.mark.parametrize("func", PAIR + SINGLE)
def test_bad_temperature_values(func, T):
    with pytest.raises(ValueError, match="temperature: must be finite and > 0"):
        if func in PAIR:
            getattr(trmath, func)(torch.zeros(1, 3), torch.zeros(1, 3), temperature=T)
        else:
            single(func, torch.zeros(1, 3), temperature=T)


@pytest.mark.parametrize("T", ("0.7", None, True, [0.7], torch.tensor([0.5, 0.7])),
                         ids=("str", "None", "bool", "list", "tensor2"))
@pytest.mark.parametrize("func", PAIR + SINGLE)
def test_bad_temperature_types(func, T):
    with pytest.raises(TypeError, match="temperature: expected a number"):
        if func in PAIR:
            getattr(trmath, func)(torch.zeros(1, 3), torch.zeros(1, 3), temperature=T)
        else:
            single(func, torch.zeros(1, 3), temperature=T)


@pytest.mark.parametrize("func", PAIR + SINGLE)
def test_temperatures_whose_inverse_overflows_are_rejected(func):
    """Below 1e-30 the kernels' 1/T overflows float (T = 1e-39 in float32 gave KL = 0 for an
    exact 1e39, JS and entropy NaN): an error; 1e-30 itself, and numpy scalars, are accepted."""
    z, w = torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([[0.0, 2.0, 1.0]])
    for T in (1e-39, 9.9e-31, np.float32(1e-39)):
        with pytest.raises(ValueError, match=r"temperature: must be >= 1e-30"):
            if func in PAIR:
                getattr(trmath, func)(z, w, temperature=T)
            else:
                single(func, z, temperature=T)
    for T in (1e-30, np.float32(0.5), np.float64(0.5), np.int64(2)):
        out = getattr(trmath, func)(z, w, temperature=T) if func in PAIR else single(func, z, temperature=T)
        assert bool(torch.isfinite(torch.as_tensor(out[0] if isinstance(out, tuple) else out)).all())


def test_temperature_accepts_int_and_one_element_tensor():
    z, w = torch.tensor([[0.0, 1.0, 3.0]]), torch.tensor([[0.5, 0.0, 2.0]])
    ref = trmath.kl(z, w, temperature=2.0)
    assert torch.equal(trmath.kl(z, w, temperature=2), ref)
    assert torch.equal(trmath.kl(z, w, temperature=torch.tensor(2.0)), ref)


# ------------------------------------------------------------------------------------------------
# devices
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("func", PAIR)
def test_different_devices_meta(func):
    """Different devices are rejected before any kernel runs (meta tensors need no GPU)."""
    with pytest.raises(ValueError, match=m("p_logits and q_logits: tensors are on different "
                                           "devices (cpu, meta)")):
        getattr(trmath, func)(torch.zeros(2, 3), torch.zeros(2, 3, device="meta"))


def test_tokens_on_another_device_meta():
    with pytest.raises(ValueError, match=m("tokens: on meta, logits on cpu")):
        trmath.token_logprobs(torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64, device="meta"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("func", PAIR)
def test_different_devices_cuda(func):
    with pytest.raises(ValueError, match="p_logits and q_logits: tensors are on different devices"):
        getattr(trmath, func)(torch.zeros(2, 3), torch.zeros(2, 3, device="cuda"))


@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)])
def test_empty_batches_give_empty_results_and_gradients(lead):
    """Zero rows (an empty batch, a fully padded minibatch) are valid input: empty outputs and
    empty gradients, on every entry point (a zero-size buffer may have a null address)."""
    V = 7
    z = torch.zeros(*lead, V, requires_grad=True)
    w = torch.zeros(*lead, V, requires_grad=True)
    t = torch.zeros(lead, dtype=torch.long)
    lp, ent = trmath.token_logprobs(z, t, return_entropy=True)
    outs = [trmath.logsumexp(z), trmath.entropy(z), trmath.token_logprobs(z, t), lp, ent]
    outs += [f(z, w) for f in (trmath.kl, trmath.tv, trmath.js)]
    for o in outs:
        assert o.shape == lead
    sum(o.sum() for o in outs).backward()
    assert z.grad.shape == z.shape and w.grad.shape == w.shape


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("V", [37, 16384 + 13, 40000])
def test_single_invalid_element_found_at_every_position(dtype, V):
    """A NaN or +inf anywhere in a row -- any vector lane, the first or last element, either side
    of a segment boundary, after masked tokens or a larger maximum -- invalidates that row alone,
    and with ``validate=False`` gives NaN there (the single-row pass finds them without a
    per-element test)."""
    g = torch.Generator().manual_seed(V)
    base = torch.randn(3, V, generator=g, dtype=torch.float64) * 4
    base[:, torch.randperm(V, generator=g)[: V // 5]] = -INF
    base[:, V // 2] = 30.0  # a large maximum in the middle of the row
    tokens = torch.tensor([0, 1, V - 1])
    positions = sorted({0, 1, 7, 8, 9, V // 2 - 1, V // 2 + 1, V - 1, min(16383, V - 1), min(16384, V - 1)})
    for value, what in ((NAN, "contains NaN"), (INF, "contains \\+inf")):
        for pos in positions:
            x = base.clone()
            x[1, pos] = value
            x = x.to(dtype)
            for func in SINGLE:
                with pytest.raises(ValueError, match=f"logits: row 1 {what}"):
                    single(func, x, tokens)
                outs = single(func, x, tokens, validate=False)
                refs = single(func, x[[0, 2]], tokens[[0, 2]])
                for o, r in zip(outs, refs):
                    assert torch.isnan(o[1]), (func, value, pos, o)
                    assert torch.equal(o[[0, 2]], r), (func, value, pos)
