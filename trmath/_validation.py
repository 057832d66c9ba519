"""Argument checking shared by the public functions.

Every error names the argument and what is wrong with it; value errors (NaN, ``+inf``, a row
that is entirely ``-inf``, token ids out of range) also name the first offending row.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable

import numpy as np
import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def from_numpy(x: Any, name: str) -> torch.Tensor:
    """A torch view of a numpy array (or of ``np.asarray(x)``), copied only where torch cannot
    view it (negative strides); a dtype torch has no counterpart for (``longdouble``, strings,
    objects) raises :class:`TypeError` naming the argument."""
    a = np.asarray(x)
    if any(s < 0 for s in a.strides):
        a = np.ascontiguousarray(a)  # torch cannot view negative strides
    try:
        return torch.from_numpy(a)
    except TypeError:
        raise TypeError(f"{name}: numpy dtype {a.dtype} has no torch counterpart") from None


def as_tensor(x: Any, name: str) -> tuple[torch.Tensor, Callable[[torch.Tensor], Any]]:
    """Return a torch view of ``x`` (no copy) and a function mapping results back.

    numpy arrays come back as numpy arrays; torch tensors stay tensors.
    """
    if isinstance(x, torch.Tensor):
        return x, lambda t: t
    if isinstance(x, np.ndarray):
        if x.dtype.kind != "f":
            raise TypeError(f"{name}: expected a floating-point array, got dtype {x.dtype}")
        if x.dtype not in (np.float16, np.float32, np.float64):
            raise TypeError(f"{name}: expected a float16, float32 or float64 array, got dtype {x.dtype}")
        return from_numpy(x, name), lambda t: t.detach().numpy()
    raise TypeError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def check_logits(t: torch.Tensor, name: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name}: expected a floating dtype (float16, bfloat16, float32, float64), got {t.dtype}"
        )
    if t.dim() < 1:
        raise ValueError(f"{name}: expected shape [..., V], got a 0-d tensor")
    if t.shape[-1] == 0:
        raise ValueError(f"{name}: the vocabulary axis (last) is empty")
    if t.dim() > 8:
        raise ValueError(f"{name}: at most 8 dimensions are supported, got {t.dim()}")


def check_pair(p: torch.Tensor, q: torch.Tensor, pname: str, qname: str) -> tuple[torch.Tensor, torch.Tensor]:
    check_logits(p, pname)
    check_logits(q, qname)
    if p.shape != q.shape:
        if p.shape[-1] != q.shape[-1]:
            raise ValueError(
                f"{pname} and {qname}: vocabulary sizes differ ({p.shape[-1]} vs {q.shape[-1]})"
            )
        raise ValueError(f"{pname} and {qname}: shapes differ ({tuple(p.shape)} vs {tuple(q.shape)})")
    if p.device != q.device:
        raise ValueError(f"{pname} and {qname}: tensors are on different devices ({p.device}, {q.device})")
    if p.dtype != q.dtype:
        # Mixed precisions are computed in the wider type (a documented copy of the narrower one).
        common = torch.promote_types(p.dtype, q.dtype)
        p, q = p.to(common), q.to(common)
    return p, q


def check_tokens(tokens: Any, logits: torch.Tensor, name: str = "tokens") -> torch.Tensor:
    if isinstance(tokens, np.integer):  # the one token of a single row, as numpy indexing gives it
        tokens = np.asarray(tokens)
    elif isinstance(tokens, int) and not isinstance(tokens, bool):
        tokens = torch.tensor(tokens, dtype=torch.int64, device=logits.device)
    if isinstance(tokens, np.ndarray):
        tokens = from_numpy(tokens, name)
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"{name}: expected an integer torch.Tensor or numpy array (or an int for a "
                        f"single row), got {type(tokens).__name__}")
    if tokens.dtype == torch.bool or tokens.is_floating_point() or tokens.is_complex():
        raise TypeError(f"{name}: expected an integer dtype, got {tokens.dtype}")
    if tuple(tokens.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"{name}: expected shape {tuple(logits.shape[:-1])} (the logits' leading axes), "
            f"got {tuple(tokens.shape)}"
        )
    if tokens.device != logits.device:
        raise ValueError(f"{name}: on {tokens.device}, logits on {logits.device}")
    return tokens


# Below this the kernels' 1/T (and z/T in float lanes) overflows float: T = 1e-39 gave KL = 0,
# JS and entropy NaN. No sampling temperature comes near it.
MIN_TEMPERATURE = 1e-30


def check_temperature(temperature: Any) -> float:
    if isinstance(temperature, (bool, np.bool_)) or not isinstance(temperature, numbers.Real):
        if isinstance(temperature, torch.Tensor) and temperature.numel() == 1:
            temperature = float(temperature)
        else:
            raise TypeError(f"temperature: expected a number, got {type(temperature).__name__}")
    t = float(temperature)
    # Comparisons, not math.isfinite: under torch.compile with a dynamic float they become
    # guards, where isfinite broke the graph (NaN fails t > 0).
    if not (t > 0.0 and t < math.inf):
        raise ValueError(f"temperature: must be finite and > 0, got {temperature!r}")
    if t < MIN_TEMPERATURE:
        raise ValueError(f"temperature: must be >= {MIN_TEMPERATURE:g} (1/T overflows the kernels' "
                         f"float arithmetic below it), got {temperature!r}")
    return t


def row_label(flat: int, lead: tuple[int, ...]) -> str:
    if len(lead) <= 1:
        return f"row {flat}"
    return f"row {tuple(int(i) for i in np.unravel_index(flat, lead))}"


_STATUS = [
    (1, 0, "contains NaN"),
    (2, 0, "contains +inf"),
    (4, 0, "is entirely -inf (no distribution)"),
    (8, 1, "contains NaN"),
    (16, 1, "contains +inf"),
    (32, 1, "is entirely -inf (no distribution)"),
    (64, 2, "is out of range"),
]


def raise_for_status(status: torch.Tensor, lead: tuple[int, ...], names: tuple[str, ...], tokens=None, V=None):
    """Raise ``ValueError`` for the first row whose status is not zero."""
    bad = torch.nonzero(status.reshape(-1)).reshape(-1)
    if bad.numel() == 0:
        return
    r = int(bad[0])
    raise_for_code(r, int(status.reshape(-1)[r]), lead, names, tokens, V)


def raise_for_code(r: int, code: int, lead: tuple[int, ...], names: tuple[str, ...], tokens=None, V=None):
    """Raise ``ValueError`` for row ``r`` (flat index) with the nonzero status ``code``."""
    for bit, arg, what in _STATUS:
        if code & bit:
            if arg == 2:
                tok = int(tokens.reshape(-1)[r])
                raise ValueError(f"tokens: entry at {row_label(r, lead)} is {tok}, outside [0, {V})")
            raise ValueError(f"{names[arg]}: {row_label(r, lead)} {what}")
    raise ValueError(f"{names[0]}: {row_label(r, lead)} is invalid (status {code})")
