"""The C++ CPU backend: the only module that imports the compiled core ``trmath._core``.

Arrays are handed to the core as typed views -- address, dtype, shape and strides -- so
torch tensors of every float dtype (bfloat16 included) and numpy arrays are read in place,
without a copy or an upcast. Outputs are allocated here and filled by the core.
"""

from __future__ import annotations

import math

import torch

from . import _core

__all__ = [
    "DTYPE_CODES",
    "isa",
    "num_threads",
    "set_num_threads",
    "single_forward",
    "single_backward",
    "pair_forward",
    "pair_backward",
]

#: torch dtype -> the core's dtype code
DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
_ELEMENT_SIZE = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4, torch.float64: 8}

#: per-row statistics: [lse, H, M, log A]; [lse_p, lse_q, a, b, m, m_lo, 6 TV side masses]
#: (see cpp/src/view.hpp)
SINGLE_STATS = 4  # [lse, H, M, log A] per row (cpp/src/view.hpp kSingleStats)
PAIR_STATS = 12
if (getattr(_core, "single_stats", None), getattr(_core, "pair_stats", None)) != (SINGLE_STATS, PAIR_STATS):
    raise ImportError(
        f"trmath._core ({_core.__file__}) writes {getattr(_core, 'single_stats', '?')} / "
        f"{getattr(_core, 'pair_stats', '?')} statistics per row where this trmath expects "
        f"{SINGLE_STATS} / {PAIR_STATS}: the compiled core is from another version; reinstall trmath")

SINGLE_OPS = {"logsumexp": 0, "entropy": 1, "token_logprobs": 2, "token_logprobs_entropy": 3}
PAIR_OPS = {"kl": 0, "tv": 1, "js": 2}


def isa() -> str:
    """Instruction set of the CPU kernels in use (``"avx512_bf16"``, ``"avx512"``, ``"avx2"`` or
    ``"generic"``; the environment variable ``TRMATH_ISA`` set to one of the last three caps it)."""
    return _core.isa()


def num_threads() -> int:
    """Number of threads the CPU kernels use."""
    return _core.num_threads()


def set_num_threads(n: int) -> None:
    """Set the number of threads of the CPU kernels (results do not depend on it)."""
    _core.set_num_threads(int(n))


_HUGE = 1 << 23  # bytes: outputs this large come from the buffer cache, or get huge-page advice


def _empty_large(shape, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous ``[N, V]`` output (a gradient, projected rows) of ``shape`` and ``dtype``.

    Large ones come from the core's buffer cache (see :func:`trmath.set_buffer_cache`): memory
    freed by an earlier output is reused already mapped, instead of being mapped and zeroed by
    the kernel page by page on first touch, which costs about as much as a KL backward itself.
    With the cache disabled they are advised to use transparent huge pages before first touch.
    """
    nbytes = math.prod(shape) * _ELEMENT_SIZE[dtype]
    if nbytes < _HUGE:
        return torch.empty(shape, dtype=dtype)
    if _core.buffer_cache_limit() > 0:
        return torch.from_dlpack(_core.pooled_empty(list(shape), DTYPE_CODES[dtype]))
    out = torch.empty(shape, dtype=dtype)
    _core.advise_hugepages(out.data_ptr(), nbytes)
    return out


def _empty_like_input(t: torch.Tensor) -> torch.Tensor:
    """A contiguous gradient buffer of ``t``'s shape and dtype (:func:`_empty_large`)."""
    return _empty_large(t.shape, t.dtype)


def set_buffer_cache(max_bytes: int) -> None:
    """Bytes of freed large outputs the core keeps for reuse (0: none, and empty the cache)."""
    _core.set_buffer_cache_limit(int(max_bytes))


def buffer_cache_info() -> dict:
    """The buffer cache's limit, content and counts of reused and fresh buffers."""
    cached, buffers, hits, misses = _core.buffer_cache_info()
    return {"limit": _core.buffer_cache_limit(), "cached_bytes": cached, "cached_buffers": buffers,
            "reused": hits, "fresh": misses}


def empty_buffer_cache() -> None:
    """Free every buffer the cache holds (outputs still in use are not affected)."""
    _core.empty_buffer_cache()


def _desc(t: torch.Tensor):
    return (t.data_ptr(), DTYPE_CODES[t.dtype], list(t.shape), list(t.stride()))


def out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def single_forward(z: torch.Tensor, tokens: torch.Tensor | None, temperature: float, op: str,
                   keep: bool = True):
    """Run a single-row reduction; returns ``(out0, out1 or None, stats[..., SINGLE_STATS], status, bad)``
    (``bad``: ``(row, status)`` of the first row whose status is not 0, or ``(-1, 0)``).
    ``keep=False`` (an eager call that wants no gradient): no statistics or status tensors are
    allocated, the core skips the statistics (and what only a backward needs) and writes the
    status to scratch, and both come back as ``None``."""
    lead = z.shape[:-1]
    odt = out_dtype(z.dtype)
    out0 = torch.empty(lead, dtype=odt)
    out1 = torch.empty(lead, dtype=odt) if op == "token_logprobs_entropy" else None
    stats = torch.empty((*lead, SINGLE_STATS), dtype=torch.float64) if keep else None
    status = torch.empty(lead, dtype=torch.int32) if keep else None
    if out0.numel() == 0:  # no rows (empty buffers may have a null address)
        return out0, out1, stats, status, (-1, 0)
    tok_ptr = 0
    if tokens is not None:
        tokens = tokens.to(torch.int64).contiguous()
        tok_ptr = tokens.data_ptr()
    bad = _core.single_forward(
        _desc(z), tok_ptr, float(temperature), SINGLE_OPS[op], out0.data_ptr(),
        out1.data_ptr() if out1 is not None else 0, stats.data_ptr() if keep else 0,
        status.data_ptr() if keep else 0,
    )
    return out0, out1, stats, status, bad


def single_backward(g0, g1, z, tokens, stats, temperature: float, op: str) -> torch.Tensor:
    """Gradient of a single-row reduction with respect to the logits (dtype of ``z``)."""
    dz = _empty_like_input(z)
    if dz.numel() == 0:
        return dz
    g0 = g0.to(torch.float64).contiguous()
    g1c = g1.to(torch.float64).contiguous() if g1 is not None else None
    stats = stats.contiguous()
    tok_ptr = 0
    if tokens is not None:
        tokens = tokens.to(torch.int64).contiguous()
        tok_ptr = tokens.data_ptr()
    _core.single_backward(
        _desc(z), tok_ptr, float(temperature), SINGLE_OPS[op], stats.data_ptr(), g0.data_ptr(),
        g1c.data_ptr() if g1c is not None else 0, dz.data_ptr(),
    )
    return dz


def pair_forward(z: torch.Tensor, w: torch.Tensor, temperature: float, op: str, keep: bool = True):
    """Run a divergence between two rows; returns ``(out, stats[..., PAIR_STATS], status, bad)``
    (``bad``: ``(row, status)`` of the first row whose status is not 0, or ``(-1, 0)``).
    ``keep=False``: no statistics or status tensors (see :func:`single_forward`)."""
    lead = z.shape[:-1]
    out = torch.empty(lead, dtype=out_dtype(z.dtype))
    stats = torch.empty((*lead, PAIR_STATS), dtype=torch.float64) if keep else None
    status = torch.empty(lead, dtype=torch.int32) if keep else None
    if not keep and out.numel() == 0:
        return out, stats, status, (-1, 0)
    bad = _core.pair_forward(
        _desc(z), _desc(w), float(temperature), PAIR_OPS[op], out.data_ptr(),
        stats.data_ptr() if keep else 0, status.data_ptr() if keep else 0,
    )
    return out, stats, status, bad


def pair_backward(g, z, w, stats, temperature: float, op: str, need_z: bool, need_w: bool):
    """Gradients of a divergence with respect to both logits (``None`` where not needed)."""
    dz = _empty_like_input(z) if need_z else None
    dw = _empty_like_input(w) if need_w else None
    g = g.to(torch.float64).contiguous()
    stats = stats.contiguous()
    _core.pair_backward(
        _desc(z), _desc(w), float(temperature), PAIR_OPS[op], stats.data_ptr(), g.data_ptr(),
        dz.data_ptr() if dz is not None else 0, dw.data_ptr() if dw is not None else 0,
    )
    return dz, dw


PROJECT_STATS = 8  # per-row statistics of the KL projection (see cpp/src/project_args.hpp)


def has_projection() -> bool:
    """Whether the compiled core has the KL-projection kernels."""
    return hasattr(_core, "project_kl_forward")


def project_kl_forward(z: torch.Tensor, w: torch.Tensor, epsilon: float, temperature: float):
    """KL projection of each row of ``z`` onto the ball around ``w``; returns
    ``(log-probs [..., V], stats [..., PROJECT_STATS], status [...])``."""
    lead = z.shape[:-1]
    out = _empty_large(z.shape, out_dtype(z.dtype))
    stats = torch.empty((*lead, PROJECT_STATS), dtype=torch.float64)
    status = torch.zeros(lead, dtype=torch.int32)
    if status.numel() == 0:
        return out, stats, status
    _core.project_kl_forward(_desc(z), _desc(w), float(epsilon), float(temperature), out.data_ptr(),
                             stats.data_ptr(), status.data_ptr())
    return out, stats, status


def has_sparse_projection() -> bool:
    """Whether the compiled core has the one-call sparse KL projection."""
    return hasattr(_core, "project_kl_sparse_forward")


def project_kl_sparse_forward(z: torch.Tensor, w: torch.Tensor, epsilon: float, slack: float):
    """The sparse KL projection of log-probability rows ``[..., S]`` in one core call (tails,
    exact-KL statistics, projection). Returns ``(log-probs [..., S + 1], eta [...])``, or None
    when some row is not valid (a log-mass outside ``(-inf, slack]``, NaN, ``+inf``, infeasible):
    the caller then takes the general path, which raises or returns that row as NaN."""
    lead, S = z.shape[:-1], z.shape[-1]
    out = torch.empty((*lead, S + 1), dtype=out_dtype(z.dtype))
    eta = torch.empty(lead, dtype=torch.float64)
    if eta.numel() and _core.project_kl_sparse_forward(_desc(z), _desc(w), float(epsilon), float(slack),
                                                       out.data_ptr(), eta.data_ptr()):
        return None
    return out, eta


def sparse_tails(z: torch.Tensor, w: torch.Tensor):
    """Both sparse-projection inputs (log-probabilities ``[..., S]``) as float64
    ``[2, ..., S + 1]`` with their tail buckets ``log(1 - sum e^x)`` appended, and the log-masses
    ``log sum e^x`` ``[2, ...]`` of their rows (NaN / ``+inf`` / ``-inf`` for a row with a NaN, a
    ``+inf``, only ``-inf``)."""
    lead, S = z.shape[:-1], z.shape[-1]
    out = torch.empty((2, *lead, S + 1), dtype=torch.float64)
    mass = torch.empty((2, *lead), dtype=torch.float64)
    if mass.numel():
        _core.sparse_tails(_desc(z), _desc(w), out.data_ptr(), mass.data_ptr())
    return out, mass


def project_kl_backward(g, z, w, stats, temperature: float, need_z: bool, need_w: bool):
    """Gradients of the KL projection with respect to both logits (``None`` where not needed)."""
    dz = _empty_like_input(z) if need_z else None
    dw = _empty_like_input(w) if need_w else None
    if (dz if dz is not None else dw) is None or z.numel() == 0:
        return dz, dw
    g = g.to(torch.float64).contiguous()
    _core.project_kl_backward(_desc(z), _desc(w), float(temperature), stats.contiguous().data_ptr(),
                              g.data_ptr(), dz.data_ptr() if dz is not None else 0,
                              dw.data_ptr() if dw is not None else 0)
    return dz, dw


TV_MIX_PRM = 5  # per-row constants of the TV projection's log-mixture (cpp/src/project_args.hpp)


def has_tv_projection() -> bool:
    """Whether the compiled core has the TV projection's log-mixture kernels."""
    return hasattr(_core, "project_tv_mix_forward")


def project_tv_mix_forward(z: torch.Tensor, w: torch.Tensor, temperature: float, prm: torch.Tensor,
                           out: torch.Tensor) -> None:
    """Writes ``logaddexp(z/T - ca, w/T - cb)`` of every row pair ``[R, V]`` into ``out`` (contiguous
    ``[R, V]``, float32 for 16/32-bit inputs, float64 for float64); ``prm``: float64
    ``[R, TV_MIX_PRM]`` = (ca, cb, lse_p, lse_q, lam)."""
    if out.numel():
        _core.project_tv_mix_forward(_desc(z), _desc(w), float(temperature), prm.contiguous().data_ptr(),
                                     out.data_ptr())


def project_tv_mix_backward(z: torch.Tensor, w: torch.Tensor, temperature: float, prm: torch.Tensor,
                            g: torch.Tensor, dz: torch.Tensor | None, dw: torch.Tensor | None,
                            dlam: torch.Tensor) -> None:
    """The log-mixture's part of the gradient (into ``dz``, ``dw``: contiguous, the inputs'
    dtype, or None) and dL/dlam through it (into ``dlam``, float64 ``[R]``); ``g``: float64
    contiguous ``[R, V]``."""
    if dlam.numel() == 0:
        return
    _core.project_tv_mix_backward(_desc(z), _desc(w), float(temperature), prm.contiguous().data_ptr(),
                                  g.data_ptr(), dz.data_ptr() if dz is not None else 0,
                                  dw.data_ptr() if dw is not None else 0, dlam.data_ptr())


def k_estimate(s: torch.Tensor, o: torch.Tensor, b: torch.Tensor | None, valid: torch.Tensor | None,
               value_kind: int, value64: bool, check: bool = False, tols=(0.0, 0.0, 0.0)):
    """k1/k2/k3 (``value_kind``) of ``lr = o - s`` element by element, times ``exp(s - b)`` if
    ``b`` is given; ``s``, ``o`` (``b``) contiguous CPU tensors of one dtype, ``valid`` a
    contiguous bool tensor of their shape or None. The value is float64 if ``value64``, else
    float32. ``s = +-inf``, ``o = +inf``, ``b = +-inf`` and NaN give NaN; entries where ``valid``
    is False give 0 (cpp/src/estimator_args.hpp). Returns ``(value, bad)``: with ``check``,
    ``bad`` tells whether some valid entry has ``s`` (``b``) NaN, -inf or above its tolerance in
    ``tols`` (for s, o, b), or ``o`` NaN or above its own."""
    val = _empty_large(tuple(s.shape), torch.float64 if value64 else torch.float32)
    n = s.numel()
    bad = False
    if n:
        bad = _core.k_estimate(s.data_ptr(), o.data_ptr(), b.data_ptr() if b is not None else 0,
                               valid.data_ptr() if valid is not None else 0, DTYPE_CODES[s.dtype], n,
                               int(value_kind), int(value_kind), val.data_ptr(), bool(value64), 0,
                               bool(check), float(tols[0]), float(tols[1]), float(tols[2]))
    return val, bad


def k_estimate_backward(g: torch.Tensor, s: torch.Tensor, o: torch.Tensor, b: torch.Tensor | None,
                        valid: torch.Tensor | None, value_kind: int, slope_kind: int,
                        need: tuple[bool, bool, bool]):
    """Gradients ``(gs, go, gb)`` of a :func:`k_estimate` call with the slope of ``slope_kind``
    (None where ``need`` is False), in the inputs' dtype, recomputed from ``s``, ``o`` (``b``);
    ``g`` float32 or float64 of their shape (an expanded scalar is read once)."""
    if g.dtype not in (torch.float32, torch.float64):
        g = g.to(torch.float32)  # exact: the values are float32 or float64
    n = s.numel()
    scalar = n > 1 and g.dim() > 0 and all(st == 0 for st in g.stride())
    if not scalar:
        g = g.contiguous()
    outs = [(_empty_large(tuple(s.shape), s.dtype) if need[i] else None) for i in range(3)]
    if b is None:
        outs[2] = None
    if n and any(x is not None for x in outs):
        _core.k_estimate_backward(s.data_ptr(), o.data_ptr(), b.data_ptr() if b is not None else 0,
                                  valid.data_ptr() if valid is not None else 0, DTYPE_CODES[s.dtype], n,
                                  int(value_kind), int(slope_kind), g.data_ptr(), g.dtype == torch.float64,
                                  scalar, *(x.data_ptr() if x is not None else 0 for x in outs))
    return tuple(outs)


def binary_coarse(lp: torch.Tensor, lq: torch.Tensor, kind: int, tol_p: float, tol_q: float, value64: bool):
    """binary_tv (``kind`` 0) or binary_kl (1) of contiguous CPU log-probabilities of one dtype,
    element by element; NaN where an entry is bad (NaN or above its tolerance; values in
    ``(0, tol]`` count as 0). Returns ``(value, bad)``: whether some entry was bad
    (cpp/src/estimator_args.hpp)."""
    val = _empty_large(tuple(lp.shape), torch.float64 if value64 else torch.float32)
    n = lp.numel()
    bad = False
    if n:
        bad = _core.binary_coarse(lp.data_ptr(), lq.data_ptr(), DTYPE_CODES[lp.dtype], n, int(kind), float(tol_p),
                                  float(tol_q), val.data_ptr(), bool(value64), 0, False, False, 0, 0)
    return val, bad


def binary_coarse_backward(g: torch.Tensor, lp: torch.Tensor, lq: torch.Tensor, kind: int, tol_p: float,
                           tol_q: float, need_p: bool, need_q: bool):
    """``(g * d/dlp, g * d/dlq)`` of :func:`binary_coarse` in the inputs' dtype (None where not
    needed), recomputed; NaN where the entry is bad, 0 for an input clamped to 0."""
    if g.dtype not in (torch.float32, torch.float64):
        g = g.to(torch.float32)
    n = lp.numel()
    scalar = n > 1 and g.dim() > 0 and all(st == 0 for st in g.stride())
    if not scalar:
        g = g.contiguous()
    gp = _empty_large(tuple(lp.shape), lp.dtype) if need_p else None
    gq = _empty_large(tuple(lq.shape), lq.dtype) if need_q else None
    if n and (need_p or need_q):
        _core.binary_coarse(lp.data_ptr(), lq.data_ptr(), DTYPE_CODES[lp.dtype], n, int(kind), float(tol_p),
                            float(tol_q), 0, False, g.data_ptr(), g.dtype == torch.float64, scalar,
                            gp.data_ptr() if gp is not None else 0, gq.data_ptr() if gq is not None else 0)
    return gp, gq


def topk_coarse(lp: torch.Tensor, lq: torch.Tensor, kind: int, tol_p: float, tol_q: float):
    """topk_tv (``kind`` 0) or topk_kl (1) of contiguous CPU ``[rows, K]`` log-probabilities of
    one 16/32-bit dtype: float32 ``[rows]``, NaN for a bad row (an entry NaN or above its
    tolerance, or a kept mass above ``exp(tol (1 + ln K))``); and whether some row was bad."""
    rows, K = lp.shape
    val = torch.empty(rows, dtype=torch.float32)
    bad = False
    if rows:
        bad = _core.topk_coarse(lp.data_ptr(), lq.data_ptr(), DTYPE_CODES[lp.dtype], rows, K, int(kind),
                                float(tol_p), float(tol_q), val.data_ptr(), False, 0, False, False, 0, 0)
    return val, bad


def mismatch_sums(s: torch.Tensor, o: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """The mismatch diagnostics' sums over the valid entries of contiguous CPU log-probabilities
    ``s`` (rollout) and ``o`` (trainer) of one dtype, ``lr = o - s``: float64 ``[6]`` holding
    sum lr, sum k3(lr), M = max lr, max |lr|, sum e^(lr - M), sum e^(2 (lr - M))
    (cpp/src/estimator_args.hpp: NaN everywhere if a valid entry is NaN; M = -inf and the others
    0 if none is valid)."""
    out = torch.empty(6, dtype=torch.float64)
    _core.mismatch_sums(s.data_ptr(), o.data_ptr(), valid.data_ptr() if valid is not None else 0,
                        DTYPE_CODES[s.dtype], s.numel(), out.data_ptr())
    return out


def topk_coarse_backward(g: torch.Tensor, lp: torch.Tensor, lq: torch.Tensor, kind: int, tol_p: float,
                         tol_q: float, need_p: bool, need_q: bool):
    """``(g * d/dlp, g * d/dlq)`` of :func:`topk_coarse` (``g``: ``[rows]``), in the inputs'
    dtype, None where not needed; recomputed."""
    if g.dtype not in (torch.float32, torch.float64):
        g = g.to(torch.float32)
    rows, K = lp.shape
    scalar = rows > 1 and g.dim() > 0 and all(st == 0 for st in g.stride())
    if not scalar:
        g = g.contiguous()
    gp = _empty_large((rows, K), lp.dtype) if need_p else None
    gq = _empty_large((rows, K), lq.dtype) if need_q else None
    if rows and (need_p or need_q):
        _core.topk_coarse(lp.data_ptr(), lq.data_ptr(), DTYPE_CODES[lp.dtype], rows, K, int(kind), float(tol_p),
                          float(tol_q), 0, False, g.data_ptr(), g.dtype == torch.float64, scalar,
                          gp.data_ptr() if gp is not None else 0, gq.data_ptr() if gq is not None else 0)
    return gp, gq


def topk_rows(z: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``[..., k]`` (int64) of the ``k`` largest logits of each row, sorted by value
    (descending) then index: ties go to the lower index, so the result is deterministic."""
    ids = torch.empty((*z.shape[:-1], k), dtype=torch.int64)
    if ids.numel():
        _core.topk_rows(_desc(z), int(k), ids.data_ptr())
    return ids


def topk_rows_sorted(z: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`topk_rows` by a stable sort, on any device: the same ids, with an ``[..., V]``
    temporary. Each value maps to an integer key whose order is the values' order, with the
    kernels' equality ``-0 == +0``; a stable descending sort of the keys keeps equal values in
    index order, so ties go to the lower index. NaN ranks as ``-inf``, as in both kernels
    (rows holding NaN are invalid input, which validation rejects)."""
    x = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z  # exact
    x = torch.where(torch.isnan(x), float("-inf"), x)
    x = torch.where(x == 0, 0.0, x)  # -0 -> +0
    bits = x.contiguous().view(torch.int32 if x.dtype == torch.float32 else torch.int64)
    low = (1 << 31) - 1 if x.dtype == torch.float32 else (1 << 63) - 1
    keys = torch.where(bits < 0, bits ^ low, bits)  # negative floats: reverse their order
    return torch.sort(keys, dim=-1, descending=True, stable=True).indices[..., :k].contiguous()


# ---------------------------------------------------------------------------------------------
# CUDA kernels (present when the extension was built with -DTRMATH_CUDA=ON)
# ---------------------------------------------------------------------------------------------
def has_cuda() -> bool:
    """Whether the compiled core holds the CUDA kernels (it was built with ``TRMATH_CUDA=ON``)."""
    return hasattr(_core, "cuda_single_forward")


def cuda_device_name() -> str:
    """Name and compute capability of the current CUDA device as the core sees it ("" if none)."""
    return _core.cuda_device_name() if has_cuda() else ""


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def cuda_single_forward(z: torch.Tensor, tokens: torch.Tensor | None, temperature: float, op: str,
                        keep: bool = True):
    """:func:`single_forward` for CUDA tensors; everything stays on ``z``'s device and stream.
    ``keep=False``: no statistics for a backward (``stats`` is None)."""
    lead = z.shape[:-1]
    odt = out_dtype(z.dtype)
    dev = z.device
    out0 = torch.empty(lead, dtype=odt, device=dev)
    out1 = torch.empty(lead, dtype=odt, device=dev) if op == "token_logprobs_entropy" else None
    stats = torch.empty((*lead, SINGLE_STATS), dtype=torch.float64, device=dev) if keep else None
    status = torch.empty(lead, dtype=torch.int32, device=dev)
    if status.numel() == 0:
        return out0, out1, stats, status
    tok_ptr = 0
    if tokens is not None:
        tokens = tokens.to(device=dev, dtype=torch.int64).contiguous()
        tok_ptr = tokens.data_ptr()
    with torch.cuda.device(dev):
        _core.cuda_single_forward(
            _desc(z), tok_ptr, float(temperature), SINGLE_OPS[op], out0.data_ptr(),
            out1.data_ptr() if out1 is not None else 0, stats.data_ptr() if keep else 0, status.data_ptr(),
            _stream(z),
        )
    return out0, out1, stats, status


def cuda_single_backward(g0, g1, z, tokens, stats, temperature: float, op: str) -> torch.Tensor:
    """:func:`single_backward` for CUDA tensors."""
    dev = z.device
    dz = torch.empty(z.shape, dtype=z.dtype, device=dev)
    if dz.numel() == 0:
        return dz
    g0 = g0.to(device=dev, dtype=torch.float64).contiguous()
    g1c = g1.to(device=dev, dtype=torch.float64).contiguous() if g1 is not None else None
    stats = stats.contiguous()
    tok_ptr = 0
    if tokens is not None:
        tokens = tokens.to(device=dev, dtype=torch.int64).contiguous()
        tok_ptr = tokens.data_ptr()
    with torch.cuda.device(dev):
        _core.cuda_single_backward(
            _desc(z), tok_ptr, float(temperature), SINGLE_OPS[op], stats.data_ptr(), g0.data_ptr(),
            g1c.data_ptr() if g1c is not None else 0, dz.data_ptr(), _stream(z),
        )
    return dz


def cuda_pair_forward(z: torch.Tensor, w: torch.Tensor, temperature: float, op: str, keep: bool = True):
    """:func:`pair_forward` for CUDA tensors. ``keep=False``: no statistics for a backward
    (``stats`` is None; TV's full pass then sums its value alone)."""
    lead = z.shape[:-1]
    dev = z.device
    out = torch.empty(lead, dtype=out_dtype(z.dtype), device=dev)
    stats = torch.empty((*lead, PAIR_STATS), dtype=torch.float64, device=dev) if keep else None
    status = torch.empty(lead, dtype=torch.int32, device=dev)
    if status.numel() == 0:
        return out, stats, status
    with torch.cuda.device(dev):
        _core.cuda_pair_forward(
            _desc(z), _desc(w), float(temperature), PAIR_OPS[op], out.data_ptr(),
            stats.data_ptr() if keep else 0, status.data_ptr(), _stream(z),
        )
    return out, stats, status


def cuda_pair_backward(g, z, w, stats, temperature: float, op: str, need_z: bool, need_w: bool):
    """:func:`pair_backward` for CUDA tensors."""
    dev = z.device
    dz = torch.empty(z.shape, dtype=z.dtype, device=dev) if need_z else None
    dw = torch.empty(w.shape, dtype=w.dtype, device=dev) if need_w else None
    if z.numel() == 0 or (dz is None and dw is None):
        return dz, dw
    g = g.to(device=dev, dtype=torch.float64).contiguous()
    stats = stats.contiguous()
    with torch.cuda.device(dev):
        _core.cuda_pair_backward(
            _desc(z), _desc(w), float(temperature), PAIR_OPS[op], stats.data_ptr(), g.data_ptr(),
            dz.data_ptr() if dz is not None else 0, dw.data_ptr() if dw is not None else 0, _stream(z),
        )
    return dz, dw


def has_cuda_projection() -> bool:
    """Whether the compiled core has the CUDA kernels of the KL projection."""
    return hasattr(_core, "cuda_project_kl_forward")


def cuda_project_kl_forward(z: torch.Tensor, w: torch.Tensor, epsilon: float, temperature: float):
    """:func:`project_kl_forward` for CUDA tensors."""
    dev = z.device
    lead = z.shape[:-1]
    out = torch.empty(z.shape, dtype=out_dtype(z.dtype), device=dev)
    stats = torch.empty((*lead, PROJECT_STATS), dtype=torch.float64, device=dev)
    status = torch.zeros(lead, dtype=torch.int32, device=dev)
    if status.numel() == 0:
        return out, stats, status
    with torch.cuda.device(dev):
        _core.cuda_project_kl_forward(_desc(z), _desc(w), float(epsilon), float(temperature),
                                      out.data_ptr(), stats.data_ptr(), status.data_ptr(), _stream(z))
    return out, stats, status


def cuda_project_kl_backward(g, z, w, stats, temperature: float, need_z: bool, need_w: bool):
    """:func:`project_kl_backward` for CUDA tensors."""
    dev = z.device
    dz = torch.empty(z.shape, dtype=z.dtype, device=dev) if need_z else None
    dw = torch.empty(w.shape, dtype=w.dtype, device=dev) if need_w else None
    if (dz if dz is not None else dw) is None or z.numel() == 0:
        return dz, dw
    g = g.to(device=dev, dtype=torch.float64).contiguous()
    stats = stats.contiguous()
    with torch.cuda.device(dev):
        _core.cuda_project_kl_backward(_desc(z), _desc(w), float(temperature), stats.data_ptr(),
                                       g.data_ptr(), dz.data_ptr() if dz is not None else 0,
                                       dw.data_ptr() if dw is not None else 0, _stream(z))
    return dz, dw


def cuda_topk_max_k() -> int:
    """Largest ``k`` of the CUDA top-k kernel (0 without the CUDA kernels)."""
    return int(getattr(_core, "cuda_topk_max_k", 0))


def cuda_topk_rows(z: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`topk_rows` for CUDA tensors: the same ids, bit for bit (value descending, then the
    lower index), on ``z``'s device and stream. ``k`` above :func:`cuda_topk_max_k` (or
    ``V >= 2**31``) takes :func:`topk_rows_sorted`, which gives the same ids through a stable
    sort with an ``[..., V]`` temporary."""
    V = z.shape[-1]
    if not 1 <= k <= V:
        raise ValueError(f"k: must be in [1, V] = [1, {V}], got {k}")
    if k > cuda_topk_max_k() or V >= 2**31:
        return topk_rows_sorted(z, k)
    dev = z.device
    ids = torch.empty((*z.shape[:-1], k), dtype=torch.int64, device=dev)
    if ids.numel() == 0:
        return ids
    with torch.cuda.device(dev):
        _core.cuda_topk_rows(_desc(z), int(k), ids.data_ptr(), _stream(z))
    return ids
