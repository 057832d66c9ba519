"""torch custom operators of the exact reductions, with autograd and fake (meta) kernels.

The operators dispatch on device: CPU tensors go to the C++ kernels (:mod:`trmath._backend`),
CUDA tensors to the CUDA kernels when the extension was built with them, every other device
(and CUDA without the kernels) to the pure-torch backend (:mod:`trmath._torch_backend`). Both fill the same
per-row statistics, which the backward operators consume, so a forward on one backend and a
backward on the other agree. Being custom operators, they are opaque to ``torch.compile``,
which traces them through their fake kernels without graph breaks.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _torch_backend as tb
from ._validation import raise_for_code, raise_for_status

_PAIR_NAMES = ("p_logits", "q_logits")
_PAIR_STATS = 12
_SINGLE_STATS = 4  # [lse, H, M, log A] per row, as the compiled core and the torch backend

_CPP = None


def _cpp():
    global _CPP
    if _CPP is None:
        from . import _backend

        _CPP = _backend
    return _CPP


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def use_cpp(t: Tensor) -> bool:
    return t.device.type == "cpu" and not _FORCE_TORCH[0]


_HAS_CUDA = []


def use_cuda(t: Tensor) -> bool:
    """Whether ``t`` goes to the compiled CUDA kernels."""
    if t.device.type != "cuda" or _FORCE_TORCH[0]:
        return False
    if not _HAS_CUDA:
        _HAS_CUDA.append(_cpp().has_cuda())
    return _HAS_CUDA[0]


# Test hook: route CPU tensors to the torch backend (parity tests).
_FORCE_TORCH = [False]


def _torch_status(z: Tensor, name_bits: int) -> Tensor:
    zz = z.reshape(-1, z.shape[-1])
    nan = torch.isnan(zz).any(-1)
    pinf = torch.isposinf(zz).any(-1)
    allneg = torch.isneginf(zz).all(-1)
    st = nan.to(torch.int32) * 1 + pinf.to(torch.int32) * 2 + (allneg & ~nan & ~pinf).to(torch.int32) * 4
    return (st * name_bits).reshape(z.shape[:-1])


def direct_call(*tensors: Tensor) -> bool:
    """Whether an eager forward may skip the custom-op dispatcher and run the op body directly.

    The ``trmath::*`` custom ops exist for autograd and for tracing (``torch.compile``, fake
    tensors, tensor subclasses, ``torch.func`` transforms); their dispatch costs ~50 us a call,
    more than the kernels on a few short rows. A call that needs none of that -- plain tensors,
    no gradient wanted, no tracing, no dispatch mode or functorch transform active -- gets the
    same body and the same results without it.
    """
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:  # torch.func transforms
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if type(t) is not torch.Tensor or (grad and t.requires_grad):
            return False
    return True


# ---------------------------------------------------------------------------------------------
# single-row reductions: logsumexp, entropy, token_logprobs (+ entropy)
# ---------------------------------------------------------------------------------------------
def single_value(z: Tensor, tokens: Optional[Tensor], temperature: float, op: str, validate: bool) -> tuple[Tensor, Optional[Tensor]]:
    """The values of :func:`single_fwd_impl` alone, for a :func:`direct_call` (no statistics for
    a backward are kept: on the C++ backends, no tensor beyond the outputs is allocated)."""
    if use_cpp(z):  # inline: the common small call, where a function layer is ~4 % of its time
        out0, out1, _, _, (r, code) = _cpp().single_forward(z, tokens, temperature, op, keep=False)
        if validate and r >= 0:
            raise_for_code(r, code, tuple(z.shape[:-1]), ("logits",), tokens, z.shape[-1])
        return out0, out1
    out0, out1, _ = single_fwd_impl(z, tokens, temperature, op, validate, keep=False)
    return out0, (out1 if op == "token_logprobs_entropy" else None)


def single_fwd_impl(z: Tensor, tokens: Optional[Tensor], temperature: float, op: str, validate: bool,
                    keep: bool = True) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """The body of the ``trmath::single_fwd`` op (see :func:`direct_call`); ``keep=False``: no
    statistics for a backward (None from the C++ backends)."""
    lead = tuple(z.shape[:-1])
    if use_cpp(z):
        out0, out1, stats, _, (r, code) = _cpp().single_forward(z, tokens, temperature, op, keep=keep)
        if validate and r >= 0:
            raise_for_code(r, code, lead, ("logits",), tokens, z.shape[-1])
        if out1 is None and keep:  # the op returns a tensor; a value call, None
            out1 = torch.zeros(0, dtype=out0.dtype)
        return out0, out1, stats
    if use_cuda(z):
        out0, out1, stats, status = _cpp().cuda_single_forward(z, tokens, temperature, op, keep=keep)
        if validate:
            raise_for_status(status.cpu(), lead, ("logits",), tokens.cpu() if tokens is not None else None, z.shape[-1])
        if out1 is None and keep:
            out1 = z.new_zeros(0, dtype=out0.dtype)
        return out0, out1, stats
    V = z.shape[-1]
    z2 = z.reshape(-1, V)
    if validate:
        status = _torch_status(z, 1)
        if tokens is not None:
            bad_tok = (tokens < 0) | (tokens >= V)
            status = status | (bad_tok.to(torch.int32) * 64)
        raise_for_status(status.cpu(), lead, ("logits",), tokens.cpu() if tokens is not None else None, V)
    if op == "logsumexp":
        out0, stats = tb.lse_forward(z2, temperature)
        out1 = z.new_zeros(0, dtype=out0.dtype)
    elif op == "entropy":
        out0, stats = tb.entropy_forward(z2, temperature)
        out1 = z.new_zeros(0, dtype=out0.dtype)
    else:
        tok = tokens.reshape(-1).to(torch.int64).clamp(0, V - 1)
        out0, h, stats = tb.token_logprobs_forward(z2, tok, temperature, op == "token_logprobs_entropy")
        out1 = h.reshape(lead) if op == "token_logprobs_entropy" else z.new_zeros(0, dtype=out0.dtype)
    return out0.reshape(lead), out1, stats.reshape(*lead, _SINGLE_STATS)


@torch.library.custom_op("trmath::single_fwd", mutates_args=())
def single_fwd(z: Tensor, tokens: Optional[Tensor], temperature: float, op: str, validate: bool) -> tuple[Tensor, Tensor, Tensor]:
    return single_fwd_impl(z, tokens, temperature, op, validate)


@single_fwd.register_fake
def _(z, tokens, temperature, op, validate):
    lead = tuple(z.shape[:-1])
    odt = _out_dtype(z.dtype)
    out1 = z.new_empty(lead if op == "token_logprobs_entropy" else (0,), dtype=odt)
    return z.new_empty(lead, dtype=odt), out1, z.new_empty((*lead, _SINGLE_STATS), dtype=torch.float64)


@torch.library.custom_op("trmath::single_bwd", mutates_args=())
def single_bwd(g0: Tensor, g1: Optional[Tensor], z: Tensor, tokens: Optional[Tensor], stats: Tensor, temperature: float, op: str) -> Tensor:
    if use_cpp(z):
        return _cpp().single_backward(g0, g1, z, tokens, stats, temperature, op)
    if use_cuda(z):
        return _cpp().cuda_single_backward(g0, g1, z, tokens, stats, temperature, op)
    V = z.shape[-1]
    z2 = z.reshape(-1, V)
    st = stats.reshape(-1, _SINGLE_STATS)
    g = g0.reshape(-1)
    if op == "logsumexp":
        dz = tb.lse_backward(g, z2, st, temperature)
    elif op == "entropy":
        dz = tb.entropy_backward(g, z2, st, temperature)
    else:
        tok = tokens.reshape(-1).to(torch.int64)
        dz = tb.token_logprobs_backward(g, g1.reshape(-1) if g1 is not None else None, z2, tok, st, temperature)
    return dz.reshape(z.shape).to(z.dtype)


@single_bwd.register_fake
def _(g0, g1, z, tokens, stats, temperature, op):
    return torch.empty_like(z, memory_format=torch.contiguous_format)


def _single_setup(ctx, inputs, output):
    z, tokens, temperature, op, validate = inputs
    ctx.save_for_backward(z, tokens, output[2])
    ctx.temperature = temperature
    ctx.op = op


def _single_backward(ctx, g0, g1, gstats):
    z, tokens, stats = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None
    g1 = g1 if ctx.op == "token_logprobs_entropy" else None
    dz = single_bwd(g0, g1, z, tokens, stats, ctx.temperature, ctx.op)
    return dz, None, None, None, None


single_fwd.register_autograd(_single_backward, setup_context=_single_setup)


# ---------------------------------------------------------------------------------------------
# divergences between two rows: kl, tv, js
# ---------------------------------------------------------------------------------------------
_TB_PAIR = {
    "kl": (tb.kl_forward, tb.kl_backward),
    "tv": (tb.tv_forward, tb.tv_backward),
    "js": (tb.js_forward, tb.js_backward),
}


def pair_value(z: Tensor, w: Tensor, temperature: float, op: str, validate: bool) -> Tensor:
    """The value of :func:`pair_fwd_impl` alone, for a :func:`direct_call` (see
    :func:`single_value`; on CUDA, TV's full pass then sums its value alone)."""
    if use_cpp(z):  # inline, as in single_value
        out, _, _, (r, code) = _cpp().pair_forward(z, w, temperature, op, keep=False)
        if validate and r >= 0:
            raise_for_code(r, code, tuple(z.shape[:-1]), _PAIR_NAMES)
        return out
    return pair_fwd_impl(z, w, temperature, op, validate, keep=False)[0]


def pair_fwd_impl(z: Tensor, w: Tensor, temperature: float, op: str, validate: bool,
                  keep: bool = True) -> tuple[Tensor, Optional[Tensor]]:
    """The body of the ``trmath::pair_fwd`` op (see :func:`direct_call`); ``keep=False``: no
    statistics for a backward (None from the C++ backends)."""
    lead = tuple(z.shape[:-1])
    if use_cpp(z):
        out, stats, _, (r, code) = _cpp().pair_forward(z, w, temperature, op, keep=keep)
        if validate and r >= 0:
            raise_for_code(r, code, lead, _PAIR_NAMES)
        return out, stats
    if use_cuda(z):
        out, stats, status = _cpp().cuda_pair_forward(z, w, temperature, op, keep=keep)
        if validate:
            raise_for_status(status.cpu(), lead, _PAIR_NAMES)
        return out, stats
    if validate:
        status = _torch_status(z, 1) | _torch_status(w, 8)
        raise_for_status(status.cpu(), lead, _PAIR_NAMES)
    V = z.shape[-1]
    out, stats = _TB_PAIR[op][0](z.reshape(-1, V), w.reshape(-1, V), temperature)
    # Columns 4-5 hold the log-ratio centre as an unevaluated sum (logit units), as in the C++
    # kernels' statistics; 6-8 are where the CPU kernels' TV backward (which these statistics may
    # also feed) finds the row maxima and the centre correction its side-mass pass works about
    # (cpp/src/kernels_bwd.cpp). (The CUDA TV backward reads the side masses its own forward stores
    # there: zeros tell it that they are missing.)
    pad = torch.zeros(stats.shape[0], _PAIR_STATS - tb._PAIR_STATS, dtype=stats.dtype, device=stats.device)
    if op == "tv" and z.device.type == "cpu":
        pad[:, 0] = z.reshape(-1, V).amax(-1).to(stats.dtype)  # column 6
        pad[:, 1] = w.reshape(-1, V).amax(-1).to(stats.dtype)  # column 7
    stats = torch.cat([stats, pad], dim=-1)
    return out.reshape(lead), stats.reshape(*lead, _PAIR_STATS)


@torch.library.custom_op("trmath::pair_fwd", mutates_args=())
def pair_fwd(z: Tensor, w: Tensor, temperature: float, op: str, validate: bool) -> tuple[Tensor, Tensor]:
    return pair_fwd_impl(z, w, temperature, op, validate)


@pair_fwd.register_fake
def _(z, w, temperature, op, validate):
    lead = tuple(z.shape[:-1])
    return z.new_empty(lead, dtype=_out_dtype(z.dtype)), z.new_empty((*lead, _PAIR_STATS), dtype=torch.float64)


@torch.library.custom_op("trmath::pair_bwd", mutates_args=())
def pair_bwd(g: Tensor, z: Tensor, w: Tensor, stats: Tensor, temperature: float, op: str, need_z: bool, need_w: bool) -> tuple[Tensor, Tensor]:
    if use_cpp(z):
        dz, dw = _cpp().pair_backward(g, z, w, stats, temperature, op, need_z, need_w)
    elif use_cuda(z):
        dz, dw = _cpp().cuda_pair_backward(g, z, w, stats, temperature, op, need_z, need_w)
    else:
        V = z.shape[-1]
        dz, dw = _TB_PAIR[op][1](g.reshape(-1), z.reshape(-1, V), w.reshape(-1, V), stats.reshape(-1, _PAIR_STATS)[:, :tb._PAIR_STATS].contiguous(), temperature, need_z, need_w)
        dz = dz.reshape(z.shape).to(z.dtype) if dz is not None else None
        dw = dw.reshape(w.shape).to(w.dtype) if dw is not None else None
    empty = z.new_empty(0)
    return (dz if dz is not None else empty, dw if dw is not None else empty)


@pair_bwd.register_fake
def _(g, z, w, stats, temperature, op, need_z, need_w):
    dz = torch.empty_like(z, memory_format=torch.contiguous_format) if need_z else z.new_empty(0)
    dw = torch.empty_like(w, memory_format=torch.contiguous_format) if need_w else w.new_empty(0)
    return dz, dw


def _pair_setup(ctx, inputs, output):
    z, w, temperature, op, validate = inputs
    ctx.save_for_backward(z, w, output[1])
    ctx.temperature = temperature
    ctx.op = op


def _pair_backward(ctx, g, gstats):
    z, w, stats = ctx.saved_tensors
    nz, nw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (nz or nw):
        return None, None, None, None, None
    dz, dw = pair_bwd(g, z, w, stats, ctx.temperature, ctx.op, nz, nw)
    return (dz if nz else None), (dw if nw else None), None, None, None


pair_fwd.register_autograd(_pair_backward, setup_context=_pair_setup)
