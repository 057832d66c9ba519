r"""Comparisons against reference values with informative failure messages.

The central check is elementwise

.. math::

    |a_i - r_i| \le \mathrm{atol} + \mathrm{rtol} \cdot |r_i| ,

where equal infinities match, ``NaN`` matches only ``NaN``, and any other non-finite mismatch
fails. On failure the message lists the worst points (largest error relative to the allowed
error), with the input rows they came from when those are supplied.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "TARGET_TOLERANCES",
    "assert_close_to_reference",
    "max_relative_error",
    "target_tolerance",
    "ulps",
]

#: Accuracy targets of the exact reductions against a high-precision oracle, as
#: ``(rtol, atol)`` by input dtype (TARGETS.md): results of 16/32-bit inputs are float32 and
#: must be accurate to ``1e-5`` relative; float64 inputs to ``1e-12``.
TARGET_TOLERANCES: dict[str, tuple[float, float]] = {
    "float16": (1e-5, 1e-30),
    "bfloat16": (1e-5, 1e-30),
    "float32": (1e-5, 1e-30),
    "float64": (1e-12, 1e-300),
}


def _dtype_name(dtype: Any) -> str:
    if isinstance(dtype, str):
        name = dtype
    elif type(dtype).__module__.startswith("torch"):
        name = str(dtype).replace("torch.", "")
    else:
        name = np.dtype(dtype).name
    aliases = {"half": "float16", "float": "float32", "double": "float64", "bf16": "bfloat16",
               "fp16": "float16", "fp32": "float32", "fp64": "float64"}
    return aliases.get(name, name)


def target_tolerance(dtype: Any) -> tuple[float, float]:
    """``(rtol, atol)`` of :data:`TARGET_TOLERANCES` for an input dtype.

    Parameters
    ----------
    dtype : str, numpy.dtype or torch.dtype
        Input dtype (``float16``, ``bfloat16``, ``float32`` or ``float64``).

    Returns
    -------
    tuple of float
    """
    name = _dtype_name(dtype)
    if name not in TARGET_TOLERANCES:
        raise ValueError(f"no target tolerance for dtype {dtype!r}; "
                         f"known: {', '.join(TARGET_TOLERANCES)}")
    return TARGET_TOLERANCES[name]


def _to64(x: Any) -> np.ndarray:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return x.detach().to(device="cpu", dtype=torch.float64).numpy()
    a = np.asarray(x)
    if a.dtype == object:
        return np.vectorize(float, otypes=[np.float64])(a) if a.size else a.astype(np.float64)
    return a.astype(np.float64)


def _describe_row(name: str, row: np.ndarray, dtype: str) -> str:
    row = np.asarray(row, dtype=np.float64).reshape(-1)
    fin = np.isfinite(row)
    n_masked = int(np.sum(row == -np.inf))
    n_bad = int(np.sum(np.isnan(row) | (row == np.inf)))
    parts = [f"{name}: V={row.size}"]
    if dtype:
        parts.append(dtype)
    if fin.any():
        parts.append(f"finite in [{row[fin].min():.6g}, {row[fin].max():.6g}]")
    if n_masked:
        parts.append(f"{n_masked} x -inf")
    if n_bad:
        parts.append(f"{n_bad} x NaN/+inf")
    head = ", ".join(f"{v:.6g}" for v in row[:4])
    parts.append(f"head=[{head}{', ...' if row.size > 4 else ''}]")
    return " ".join(parts)


def _input_arrays(inputs: Any) -> list[tuple[str, np.ndarray, str]]:
    if inputs is None:
        return []
    if isinstance(inputs, Mapping):
        items = list(inputs.items())
    elif isinstance(inputs, (tuple, list)):
        names = ("z", "w") if len(inputs) == 2 else tuple(f"x{i}" for i in range(len(inputs)))
        items = list(zip(names, inputs))
    else:
        items = [("z", inputs)]
    out = []
    for nm, arr in items:
        dt = getattr(arr, "dtype", "")
        out.append((str(nm), _to64(arr), _dtype_name(dt) if dt != "" else ""))
    return out


def _errors(a: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Absolute error, and masks of matching specials and mismatching non-finite values."""
    with np.errstate(all="ignore"):
        both_nan = np.isnan(a) & np.isnan(r)
        same = (a == r) | both_nan
        nonfinite = ~(np.isfinite(a) & np.isfinite(r))
        err = np.where(same, 0.0, np.abs(a - r))
        err = np.where(~same & nonfinite, np.inf, err)
    return err, same, ~same & nonfinite


def assert_close_to_reference(
    actual: Any,
    reference: Any,
    *,
    rtol: float,
    atol: float,
    inputs: Any = None,
    name: str = "",
    max_report: int = 5,
) -> None:
    r"""Assert :math:`|a_i - r_i| \le \mathrm{atol} + \mathrm{rtol}\,|r_i|` elementwise.

    Parameters
    ----------
    actual : array_like or torch.Tensor
        Values under test (any float dtype; compared in ``float64``).
    reference : array_like
        Reference values, e.g. from :func:`trmath.testing.mp_batch`; may hold
        :class:`mpmath.mpf` objects. Must broadcast against ``actual``.
    rtol, atol : float
        Relative and absolute tolerance.
    inputs : array_like, tuple of array_like or dict, optional
        The ``[..., V]`` input rows (``z`` or ``(z, w)`` or ``{"name": array}``) whose leading
        shape matches the values; the failing rows are described in the message.
    name : str, optional
        What is being checked, for the message.
    max_report : int, optional
        How many of the worst points to list.

    Raises
    ------
    AssertionError
        Listing, for the worst points: index, actual, reference, absolute and relative error,
        and a short description of the input rows.

    Examples
    --------
    >>> import numpy as np
    >>> from trmath.testing import assert_close_to_reference
    >>> assert_close_to_reference(np.array([1.0, np.inf]), [1.0 + 1e-9, np.inf],
    ...                           rtol=1e-6, atol=0.0)
    """
    a, r = _to64(actual), _to64(reference)
    try:
        a, r = np.broadcast_arrays(a, r)
    except ValueError:
        raise AssertionError(
            f"{name or 'values'}: shape {a.shape} does not match the reference shape {r.shape}"
        ) from None
    err, _, mismatch = _errors(a, r)
    allowed = atol + rtol * np.abs(np.where(np.isfinite(r), r, 0.0))
    with np.errstate(all="ignore"):
        bad = mismatch | (err > allowed)
    if not bad.any():
        return
    with np.errstate(all="ignore"):
        score = np.where(mismatch, np.inf, err / np.where(allowed > 0, allowed, np.nan))
        score = np.where(np.isnan(score), np.inf, score)
        rel = np.where(r != 0, err / np.abs(r), np.where(err == 0, 0.0, np.inf))
    flat_bad = np.flatnonzero(bad.reshape(-1))
    order = flat_bad[np.argsort(-score.reshape(-1)[flat_bad], kind="stable")][:max_report]
    rows = _input_arrays(inputs)
    label = f"{name}: " if name else ""
    lines = [
        (
            f"{label}{flat_bad.size} of {a.size} values violate "
            f"|actual - reference| <= {atol:g} + {rtol:g} * |reference|; worst:"
        )
    ]
    for k in order:
        idx = np.unravel_index(int(k), a.shape) if a.ndim else ()
        line = (
            f"  [{', '.join(str(int(i)) for i in idx)}] actual={float(a[idx])!r} "
            f"reference={float(r[idx])!r} abs_err={err[idx]:.3e} rel_err={rel[idx]:.3e}"
        )
        for nm, arr, dt in rows:
            if arr.ndim >= 1 and arr.shape[:-1] == a.shape:
                line += "\n      " + _describe_row(nm, arr[idx], dt)
        lines.append(line)
    raise AssertionError("\n".join(lines))


def max_relative_error(actual: Any, reference: Any, atol: float = 0.0) -> float:
    r"""Worst relative error :math:`\max_i |a_i - r_i| / \max(|r_i|, \mathrm{atol})`.

    Matching infinities and ``NaN`` pairs count as exact; any other non-finite mismatch gives
    ``inf``, as does a nonzero error against a zero reference when ``atol`` is 0.

    Parameters
    ----------
    actual, reference : array_like
        Values and reference (broadcast together).
    atol : float, optional
        Floor of the denominator, so tiny references do not dominate.

    Returns
    -------
    float
        ``0.0`` for empty inputs.
    """
    a, r = np.broadcast_arrays(_to64(actual), _to64(reference))
    if a.size == 0:
        return 0.0
    err, _, mismatch = _errors(a, r)
    denom = np.maximum(np.abs(np.where(np.isfinite(r), r, 0.0)), atol)
    with np.errstate(all="ignore"):
        ratio = np.where(err == 0, 0.0, err / denom)
    ratio = np.where(mismatch, np.inf, ratio)
    return float(np.max(ratio))


def _finfo(dtype: Any) -> tuple[float, float]:
    """``(eps, smallest normal)`` of a float dtype, including bfloat16."""
    name = _dtype_name(dtype)
    if name == "bfloat16":
        return 2.0**-7, 2.0**-126
    fi = np.finfo(np.dtype(name))
    return float(fi.eps), float(fi.tiny)


def ulps(actual: Any, reference: Any, dtype: Any = "float64") -> np.ndarray:
    r"""Error in units in the last place of ``dtype`` at the reference value.

    .. math::

        \frac{|a_i - r_i|}{\operatorname{ulp}_{\mathrm{dtype}}(r_i)}, \qquad
        \operatorname{ulp}(r) = \max\bigl(\epsilon \, 2^{\lfloor \log_2 |r| \rfloor},
        \epsilon \cdot \mathrm{tiny}\bigr),

    (the spacing of the dtype's numbers just above :math:`|r|`, down to the subnormal
    spacing). Matching infinities and ``NaN`` pairs give 0, other non-finite mismatches ``inf``.

    Parameters
    ----------
    actual, reference : array_like
        Values and reference.
    dtype : str, numpy.dtype or torch.dtype, optional
        Format whose spacing is the unit (``float16``, ``bfloat16``, ``float32``, ``float64``).

    Returns
    -------
    numpy.ndarray of float64
    """
    a, r = np.broadcast_arrays(_to64(actual), _to64(reference))
    eps, tiny = _finfo(dtype)
    err, _, mismatch = _errors(a, r)
    with np.errstate(all="ignore"):
        _, e = np.frexp(np.where(np.isfinite(r), np.abs(r), 0.0))
        unit = np.maximum(np.ldexp(eps, e - 1), eps * tiny)
        out = np.where(err == 0, 0.0, err / unit)
    return np.where(mismatch, np.inf, out)
