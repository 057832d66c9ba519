r"""Input generators for testing divergences of logit rows.

Two kinds of generator live here:

* `Hypothesis <https://hypothesis.readthedocs.io>`_ strategies (:func:`logit_rows`,
  :func:`row_pairs`, :func:`row_and_token`, :func:`batches`, :func:`temperatures`) for property
  tests. They need the ``hypothesis`` package, which is imported only when a strategy is built.
* Deterministic adversarial generators (:func:`adversarial_rows`, :func:`adversarial_pairs`,
  :func:`adversarial_batch`) for sweeps and benchmarks' correctness checks. They use
  :class:`StableRNG`, a counter-based SplitMix64 generator written with NumPy integer and
  float arithmetic only (no transcendental functions), so a given seed produces bit-identical
  inputs on every platform and NumPy version.

Every generator builds its rows in ``float64`` and, when a ``dtype`` is given (``"float16"``,
``"bfloat16"``, ``"float32"``, ``"float64"`` or a :class:`torch.dtype`), *casts first*: derived
rows (a perturbed copy, a shifted copy) are computed from the already-rounded values and cast
again, and a :class:`torch.Tensor` of that dtype is returned. The tensor holds exactly the
values a kernel will read, and :mod:`trmath.testing.oracles` converts them back exactly, so the
oracle and the kernel always see the same inputs. With ``dtype=None`` NumPy ``float64`` arrays
are returned; callers that cast such arrays themselves must give the oracle the cast values.

Families
--------
Rows (:data:`ROW_FAMILIES`):

``normal``
    :math:`z = c + s\,\xi`, :math:`\xi` approximately standard normal, scale :math:`s \le 4`,
    row offset :math:`c` up to :math:`\pm 100`.
``wide``
    scale up to 300 (logit spreads of a few thousand).
``peaked``
    one logit far above the others: :math:`z_k \mathrel{+}= \Delta`,
    :math:`\Delta \in [10, 10^4]`.
``masked``
    some entries ``-inf`` (a fraction up to all but one; never all).
``constant``
    every finite entry equal.
``elements``
    (Hypothesis only) every entry drawn independently by Hypothesis from
    :math:`[-10^4, 10^4] \cup \{-\infty\}`, so shrinking works element by element.

Pairs :math:`(z, w)` (:data:`PAIR_FAMILIES`):

``independent``
    two unrelated rows.
``near``
    :math:`w = z + \sigma \xi` with :math:`\sigma \in [10^{-7}, 10^{-2}]`, or :math:`z` with a few
    entries moved by one unit in the last place of the target dtype: KL down to
    :math:`\sim 10^{-12}` after casting (and far below in float64).
``offset``
    :math:`w = z + c` (:math:`|c|` up to :math:`10^3`), with or without extra tiny noise;
    exactly the same distribution where :math:`z + c` is exact.
``peaked``
    peaked rows with the same peak and tiny noise, a moved peak, or a changed spread.
``masked``
    ``-inf`` in :math:`z` only, in :math:`w` only (:math:`q_i = 0 < p_i`, so
    :math:`\mathrm{KL} = +\infty`), at the same places, or independently in both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Union

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from hypothesis.strategies import SearchStrategy

__all__ = [
    "DTYPES",
    "ODD_SIZES",
    "PAIR_FAMILIES",
    "ROW_FAMILIES",
    "LabeledPair",
    "LabeledRow",
    "StableRNG",
    "adversarial_batch",
    "adversarial_pairs",
    "adversarial_rows",
    "batches",
    "cast",
    "logit_rows",
    "row_and_token",
    "row_pairs",
    "temperatures",
]

#: Names of the floating dtypes the generators can produce.
DTYPES: tuple[str, ...] = ("float16", "bfloat16", "float32", "float64")

#: Row families built by :func:`logit_rows` and :func:`adversarial_rows`. ``"elements"`` is
#: available to the Hypothesis strategies only.
ROW_FAMILIES: tuple[str, ...] = ("normal", "wide", "peaked", "masked", "constant", "elements")

#: Pair families built by :func:`row_pairs` and :func:`adversarial_pairs`.
PAIR_FAMILIES: tuple[str, ...] = ("independent", "near", "offset", "peaked", "masked")

#: Sizes that tend to expose blocking, vector-width and tail-handling bugs (powers of two and
#: their neighbours, primes, real vocabulary sizes).
ODD_SIZES: tuple[int, ...] = (
    1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257,
    509, 511, 512, 513, 1000, 1023, 1024, 1025, 4095, 4096, 4097, 8191, 32000, 32768, 50257,
    65537, 131072, 151936, 262144,
)

DType = Union[str, "torch.dtype", None]

_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15

# parameter grids: exact binary or short decimal literals, never computed with exp/log, so the
# generated values do not depend on the platform's libm
_SCALES = (1.0, 0.5, 2.0, 0.125, 4.0, 0.1)
_OFFSETS = (0.0, -5.0, 3.25, 20.0, -100.0)
_WIDE_SCALES = (30.0, 10.0, 100.0, 300.0)
_SPREADS = (10.0, 100.0, 1000.0, 3000.0, 10000.0)
_SIGMAS = (1e-3, 1e-7, 1e-6, 1e-5, 1e-4, 1e-2)
_SHIFTS = (1.0, -1000.0, -7.5, 0.125, 3.0, 64.0, 1000.0, -1.0)
_SHIFT_NOISE = (0.0, 1e-6, 1e-3)
_CONSTANTS = (0.0, -3.5, 17.0, 1000.0)
_MASK_FRACTIONS = (0.5, 0.1, 0.9, 1.0)  # 1.0: all but one entry masked
_ELEMENT_BOUND = 1e4


# --------------------------------------------------------------------------------------------
# deterministic random numbers
# --------------------------------------------------------------------------------------------
def _mix_int(x: int) -> int:
    """SplitMix64 finaliser on a Python integer."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _mix(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


class StableRNG:
    r"""Counter-based SplitMix64 generator with platform-independent outputs.

    The :math:`k`-th 64-bit output (:math:`k = 1, 2, \dots`) is
    :math:`\operatorname{mix}(s + k\,\gamma \bmod 2^{64})` with the SplitMix64 finaliser and
    :math:`\gamma = \mathtt{0x9E3779B97F4A7C15}`. Uniforms are the top 53 bits scaled by
    :math:`2^{-53}`; normals are Irwin–Hall sums of 12 uniforms minus 6 (mean 0, variance 1,
    support :math:`[-6, 6]`). Only integer and float additions and multiplications are used, so
    the outputs are bit-identical on every platform and NumPy version.

    Parameters
    ----------
    seed : int
        Any Python integer (reduced modulo :math:`2^{64}`).

    Examples
    --------
    >>> from trmath.testing import StableRNG
    >>> StableRNG(0).uniform(2)
    array([0.88331081, 0.431528  ])
    """

    def __init__(self, seed: int = 0) -> None:
        self._state = int(seed) & _MASK64

    def spawn(self, key: int) -> StableRNG:
        """An independent generator for sub-stream ``key`` (the parent is not advanced)."""
        return StableRNG(_mix_int(self._state ^ _mix_int(int(key) * 0xD1B54A32D192ED03 + 1)))

    def next_u64(self, n: int) -> np.ndarray:
        """``n`` raw 64-bit outputs as ``uint64``."""
        k = np.arange(1, n + 1, dtype=np.uint64)
        with np.errstate(over="ignore"):
            x = np.uint64(self._state) + k * np.uint64(_GAMMA)
        self._state = (self._state + n * _GAMMA) & _MASK64
        return _mix(x)

    def uniform(self, n: int, low: float = 0.0, high: float = 1.0) -> np.ndarray:
        """``n`` uniforms on ``[low, high)``."""
        u = (self.next_u64(n) >> np.uint64(11)).astype(np.float64) * (2.0**-53)
        return low + (high - low) * u

    def normal(self, n: int) -> np.ndarray:
        """``n`` approximately standard normal values (Irwin–Hall, 12 terms)."""
        u = self.uniform(12 * n).reshape(n, 12)
        total = np.zeros(n)
        for j in range(12):  # fixed summation order
            total = total + u[:, j]
        return total - 6.0

    def integers(self, low: int, high: int, n: int | None = None) -> Any:
        """Integers in ``[low, high)`` (one ``int`` when ``n`` is None, else an array)."""
        m = 1 if n is None else n
        v = low + np.floor(self.uniform(m) * (high - low)).astype(np.int64)
        v = np.minimum(v, high - 1)
        return int(v[0]) if n is None else v

    def choice(self, seq: Sequence[Any]) -> Any:
        """One element of ``seq``."""
        return seq[self.integers(0, len(seq))]


# --------------------------------------------------------------------------------------------
# dtype handling
# --------------------------------------------------------------------------------------------
def _torch_dtype(dtype: DType) -> Any:
    import torch

    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise ValueError(f"unsupported dtype {dtype}; use one of {', '.join(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return getattr(torch, str(dtype))


def cast(x: np.ndarray, dtype: DType) -> Any:
    """Round a ``float64`` array to ``dtype`` (round to nearest even).

    Parameters
    ----------
    x : numpy.ndarray
        Values; finite entries are clipped to the dtype's largest finite value first, so a
        valid row stays valid.
    dtype : {"float16", "bfloat16", "float32", "float64"}, torch.dtype or None
        ``None`` returns ``x`` unchanged (``float64`` NumPy array).

    Returns
    -------
    torch.Tensor or numpy.ndarray
    """
    x = np.asarray(x, dtype=np.float64)
    if dtype is None:
        return x
    import torch

    td = _torch_dtype(dtype)
    big = float(torch.finfo(td).max)
    x = np.where(np.isfinite(x), np.clip(x, -big, big), x)
    return torch.from_numpy(np.ascontiguousarray(x)).to(td)


def _as64(x: Any) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x.astype(np.float64)
    import torch

    return x.detach().to(dtype=torch.float64).numpy()


def _nudge(x: np.ndarray, idx: np.ndarray, up: np.ndarray, dtype: DType) -> np.ndarray:
    """Move ``x[idx]`` one unit in the last place of ``dtype`` (up where ``up``)."""
    y = x.copy()
    if idx.size == 0:
        return y
    if dtype is None or dtype == "float64":
        y[idx] = np.nextafter(x[idx], np.where(up, np.inf, -np.inf))
        return y
    import torch

    td = _torch_dtype(dtype)
    t = torch.from_numpy(np.ascontiguousarray(x[idx])).to(td)
    target = torch.from_numpy(np.where(up, np.inf, -np.inf)).to(td)
    y[idx] = torch.nextafter(t, target).to(torch.float64).numpy()
    return y


# --------------------------------------------------------------------------------------------
# family builders (float64 values; `dtype` only used for ulp-sized moves and casting)
# --------------------------------------------------------------------------------------------
def _keep_one(mask: np.ndarray, rng: StableRNG) -> np.ndarray:
    """Ensure at least one unmasked entry."""
    if mask.all():
        mask = mask.copy()
        mask[rng.integers(0, mask.size)] = False
    return mask


def _mask_of(V: int, rng: StableRNG, frac: float) -> np.ndarray:
    if V == 1:
        return np.zeros(1, dtype=bool)
    if frac >= 1.0:
        mask = np.ones(V, dtype=bool)
        mask[rng.integers(0, V)] = False
        return mask
    return _keep_one(rng.uniform(V) < frac, rng)


def _build_row(
    rng: StableRNG, V: int, family: str, allow_masked: bool = True
) -> tuple[np.ndarray, dict[str, Any]]:
    if family == "normal":
        s, c = rng.choice(_SCALES), rng.choice(_OFFSETS)
        return c + s * rng.normal(V), {"scale": s, "offset": c}
    if family == "wide":
        s = rng.choice(_WIDE_SCALES)
        return s * rng.normal(V), {"scale": s}
    if family == "peaked":
        spread, k = rng.choice(_SPREADS), rng.integers(0, V)
        z = rng.normal(V)
        z[k] += spread
        return z, {"spread": spread, "peak": k}
    if family == "masked":
        frac = rng.choice(_MASK_FRACTIONS)
        z = rng.choice(_SCALES) * rng.normal(V)
        z[_mask_of(V, rng, frac)] = -np.inf
        return z, {"mask_fraction": frac}
    if family == "constant":
        c = rng.choice(_CONSTANTS)
        z = np.full(V, c)
        if V > 1 and rng.integers(0, 2) and allow_masked:
            z[_mask_of(V, rng, 0.5)] = -np.inf
        return z, {"value": c}
    raise ValueError(
        f"unknown row family {family!r}; valid families are "
        f"{', '.join(f for f in ROW_FAMILIES if f != 'elements')}"
    )


def _build_pair(
    rng: StableRNG, V: int, family: str, dtype: DType, allow_infinite_kl: bool
) -> tuple[Any, Any, dict[str, Any]]:
    """Build ``(z, w)`` already cast to ``dtype``; derived rows start from the cast ``z``."""
    if family == "independent":
        fz, fw = rng.choice(("normal", "wide")), rng.choice(("normal", "normal", "wide"))
        z, pz = _build_row(rng, V, fz)
        w, pw = _build_row(rng, V, fw)
        return cast(z, dtype), cast(w, dtype), {"z": pz, "w": pw}
    if family == "near":
        s = rng.choice(_SCALES)  # no row offset: keep the ulp of the cast values small
        z, pz = s * rng.normal(V), {"scale": s}
        zc = cast(z, dtype)
        z64 = _as64(zc)
        if rng.integers(0, 3) == 0:  # a few entries one ulp away
            k = min(V, rng.choice((1, 2, 5)))
            idx = np.unique(rng.integers(0, V, k))
            up = rng.uniform(idx.size) < 0.5
            return zc, cast(_nudge(z64, idx, up, dtype), dtype), {"ulps": int(idx.size), **pz}
        sigma = rng.choice(_SIGMAS)
        return zc, cast(z64 + sigma * rng.normal(V), dtype), {"sigma": sigma, **pz}
    if family == "offset":
        z, pz = _build_row(rng, V, "normal")
        zc = cast(z, dtype)
        c, noise = rng.choice(_SHIFTS), rng.choice(_SHIFT_NOISE)
        w = _as64(zc) + c
        if noise:
            w = w + noise * rng.normal(V)
        return zc, cast(w, dtype), {"shift": c, "noise": noise, **pz}
    if family == "peaked":
        z, pz = _build_row(rng, V, "peaked")
        zc = cast(z, dtype)
        z64 = _as64(zc)
        mode = rng.choice(("same", "moved", "respread"))
        k = pz["peak"]
        if mode == "same" or V == 1:
            sigma = rng.choice(_SIGMAS)
            w = z64 + sigma * rng.normal(V)
        elif mode == "moved":
            w = z64.copy()
            j = (k + 1 + rng.integers(0, V - 1)) % V
            w[j], w[k] = w[k], w[j]
        else:
            w = z64.copy()
            w[k] = w[k] - pz["spread"] * rng.choice((0.5, 0.999, -0.5))
        return zc, cast(w, dtype), {"mode": mode, **pz}
    if family == "masked":
        base = rng.choice(("independent", "near"))
        z = rng.choice(_SCALES) * rng.normal(V)
        if base == "near":
            w = z + 1e-3 * rng.normal(V)
        else:
            w = rng.choice(_SCALES) * rng.normal(V)
        modes = ("z", "w", "both", "mixed") if allow_infinite_kl else ("z", "both", "subset")
        mode = rng.choice(modes)
        frac = rng.choice((0.1, 0.5, 0.9))
        if V == 1:
            mode = "none"
        elif mode == "z":
            z[_mask_of(V, rng, frac)] = -np.inf
        elif mode == "w":
            w[_mask_of(V, rng, frac)] = -np.inf
        elif mode == "both":
            m = _mask_of(V, rng, frac)
            z[m] = -np.inf
            w[m] = -np.inf
        elif mode == "mixed":
            z[_mask_of(V, rng, frac)] = -np.inf
            w[_mask_of(V, rng, frac)] = -np.inf
        else:  # "subset": w masked only where z is (KL stays finite)
            mz = _mask_of(V, rng, frac)
            z[mz] = -np.inf
            w[mz & (rng.uniform(V) < 0.5)] = -np.inf
        return cast(z, dtype), cast(w, dtype), {"mode": mode, "base": base, "mask_fraction": frac}
    raise ValueError(
        f"unknown pair family {family!r}; valid families are {', '.join(PAIR_FAMILIES)}"
    )


# --------------------------------------------------------------------------------------------
# deterministic adversarial generators
# --------------------------------------------------------------------------------------------
class LabeledRow(NamedTuple):
    """A generated row with its family and parameters."""

    family: str
    z: Any
    params: dict[str, Any]


class LabeledPair(NamedTuple):
    """A generated pair of rows with its family and parameters."""

    family: str
    z: Any
    w: Any
    params: dict[str, Any]


def _families(families: Sequence[str] | str | None, valid: Sequence[str]) -> tuple[str, ...]:
    if families is None:
        return tuple(valid)
    fam = (families,) if isinstance(families, str) else tuple(families)
    bad = [f for f in fam if f not in valid]
    if bad or not fam:
        raise ValueError(f"unknown families {bad}; valid families are {', '.join(valid)}")
    return fam


def adversarial_rows(
    V: int,
    n: int,
    seed: int = 0,
    dtype: DType = None,
    families: Sequence[str] | str | None = None,
) -> list[LabeledRow]:
    """Deterministic single rows cycling through the row families.

    Parameters
    ----------
    V : int
        Row length (vocabulary size), ``>= 1``.
    n : int
        Number of rows.
    seed : int, optional
        Item ``i`` depends only on ``(seed, i)``, not on ``n``.
    dtype : str, torch.dtype or None, optional
        Target dtype (a torch tensor is returned) or None for ``float64`` NumPy rows.
    families : str or sequence of str, optional
        Subset of ``("normal", "wide", "peaked", "masked", "constant")``; item ``i`` uses
        ``families[i % len(families)]``.

    Returns
    -------
    list of LabeledRow
    """
    if V < 1:
        raise ValueError(f"V must be >= 1, got {V}")
    fams = _families(families, [f for f in ROW_FAMILIES if f != "elements"])
    root = StableRNG(seed)
    out = []
    for i in range(n):
        fam = fams[i % len(fams)]
        z, params = _build_row(root.spawn(i), V, fam)
        out.append(LabeledRow(fam, cast(z, dtype), params))
    return out


def adversarial_pairs(
    V: int,
    n: int,
    seed: int = 0,
    dtype: DType = None,
    families: Sequence[str] | str | None = None,
    allow_infinite_kl: bool = True,
) -> list[LabeledPair]:
    """Deterministic pairs of rows cycling through the pair families.

    Parameters
    ----------
    V : int
        Row length (vocabulary size), ``>= 1``.
    n : int
        Number of pairs.
    seed : int, optional
        Item ``i`` depends only on ``(seed, i)``, not on ``n``.
    dtype : str, torch.dtype or None, optional
        Target dtype (torch tensors are returned) or None for ``float64`` NumPy rows.
    families : str or sequence of str, optional
        Subset of :data:`PAIR_FAMILIES`; item ``i`` uses ``families[i % len(families)]``.
    allow_infinite_kl : bool, optional
        If False, ``w`` is never ``-inf`` where ``z`` is finite.

    Returns
    -------
    list of LabeledPair
    """
    if V < 1:
        raise ValueError(f"V must be >= 1, got {V}")
    fams = _families(families, PAIR_FAMILIES)
    root = StableRNG(seed)
    out = []
    for i in range(n):
        fam = fams[i % len(fams)]
        z, w, params = _build_pair(root.spawn(i), V, fam, dtype, allow_infinite_kl)
        out.append(LabeledPair(fam, z, w, params))
    return out


def adversarial_batch(
    n: int,
    V: int,
    seed: int = 0,
    dtype: DType = None,
    pairs: bool = True,
    families: Sequence[str] | str | None = None,
    allow_infinite_kl: bool = True,
) -> tuple[list[str], Any, Any]:
    """Stack :func:`adversarial_pairs` (or :func:`adversarial_rows`) into ``[n, V]`` inputs.

    Parameters
    ----------
    n : int
        Number of rows.
    V : int
        Row length.
    seed : int, optional
        Row ``i`` depends only on ``(seed, i)``.
    dtype : str, torch.dtype or None, optional
        Target dtype (torch tensors) or None for ``float64`` NumPy arrays.
    pairs : bool, optional
        Build pairs (:data:`PAIR_FAMILIES`) or single rows (row families).
    families : str or sequence of str, optional
        Subset of the families to cycle through.
    allow_infinite_kl : bool, optional
        For pairs: if False, ``w`` is never ``-inf`` where ``z`` is finite.

    Returns
    -------
    labels : list of str
        Family of each row.
    z : torch.Tensor or numpy.ndarray, shape (n, V)
        First rows (the only rows when ``pairs`` is False).
    w : torch.Tensor or numpy.ndarray, shape (n, V), or None
        Second rows; None when ``pairs`` is False.
    """
    if pairs:
        items = adversarial_pairs(V, n, seed, dtype, families, allow_infinite_kl)
        return [it.family for it in items], _stack([it.z for it in items]), _stack(
            [it.w for it in items])
    rows = adversarial_rows(V, n, seed, dtype, families)
    return [r.family for r in rows], _stack([r.z for r in rows]), None


def _stack(rows: list[Any]) -> Any:
    if rows and not isinstance(rows[0], np.ndarray):
        import torch

        return torch.stack(rows)
    return np.stack(rows) if rows else np.empty((0, 0))


# --------------------------------------------------------------------------------------------
# Hypothesis strategies
# --------------------------------------------------------------------------------------------
def _st() -> Any:
    try:
        import hypothesis.strategies as st
    except ImportError as exc:  # pragma: no cover
        raise ImportError(
            "the trmath.testing strategies need hypothesis: pip install 'trmath[test]'"
        ) from exc
    return st


def _sizes(min_v: int, max_v: int) -> SearchStrategy[int]:
    st = _st()
    if not 1 <= min_v <= max_v:
        raise ValueError(f"need 1 <= min_v <= max_v, got {min_v}, {max_v}")
    odd = [v for v in ODD_SIZES if min_v <= v <= max_v]
    ints = st.integers(min_value=min_v, max_value=max_v)
    return st.one_of(st.sampled_from(odd), ints) if odd else ints


def _seeds() -> SearchStrategy[int]:
    return _st().integers(min_value=0, max_value=_MASK64)


def _elements_row(V: int, allow_masked: bool) -> SearchStrategy[np.ndarray]:
    st = _st()
    finite = st.floats(min_value=-_ELEMENT_BOUND, max_value=_ELEMENT_BOUND, allow_nan=False,
                       allow_infinity=False)
    elem = st.one_of(finite, st.just(-np.inf)) if allow_masked else finite

    def fix(values: list[float]) -> np.ndarray:
        z = np.asarray(values, dtype=np.float64)
        if not np.isfinite(z).any():
            z[0] = 0.0
        return z

    return st.lists(elem, min_size=V, max_size=V).map(fix)


def logit_rows(
    min_v: int = 1,
    max_v: int = 64,
    *,
    dtype: DType = None,
    allow_masked: bool = True,
    family: str | None = None,
) -> SearchStrategy[Any]:
    """Hypothesis strategy for one row of logits (never all ``-inf``, never NaN or ``+inf``).

    Parameters
    ----------
    min_v, max_v : int, optional
        Range of the row length; sizes from :data:`ODD_SIZES` in the range are favoured.
    dtype : str, torch.dtype or None, optional
        ``None``: a ``float64`` NumPy array; otherwise a :class:`torch.Tensor` of that dtype.
    allow_masked : bool, optional
        Allow ``-inf`` entries (the ``masked`` family, masks in ``constant`` and ``elements``).
    family : str, optional
        One of :data:`ROW_FAMILIES`; by default any of them.

    Returns
    -------
    hypothesis.strategies.SearchStrategy
    """
    st = _st()
    fams = [f for f in ROW_FAMILIES if allow_masked or f != "masked"]
    if family is not None:
        if family not in ROW_FAMILIES:
            raise ValueError(f"unknown row family {family!r}; valid: {', '.join(ROW_FAMILIES)}")
        fams = [family]

    @st.composite
    def build(draw: Any) -> Any:
        V = draw(_sizes(min_v, max_v))
        fam = draw(st.sampled_from(fams))
        if fam == "elements":
            z = draw(_elements_row(V, allow_masked))
        else:
            z, _ = _build_row(StableRNG(draw(_seeds())), V, fam, allow_masked)
        return cast(z, dtype)

    return build()


def row_pairs(
    min_v: int = 1,
    max_v: int = 64,
    *,
    dtype: DType = None,
    family: str | None = None,
    allow_infinite_kl: bool = True,
) -> SearchStrategy[tuple[Any, Any]]:
    """Hypothesis strategy for a pair ``(z, w)`` of equal-shape logit rows.

    Parameters
    ----------
    min_v, max_v : int, optional
        Range of the row length.
    dtype : str, torch.dtype or None, optional
        ``None``: ``float64`` NumPy arrays; otherwise :class:`torch.Tensor` objects of that
        dtype (``w`` derived from the already-cast ``z``).
    family : str, optional
        One of :data:`PAIR_FAMILIES`; by default any of them.
    allow_infinite_kl : bool, optional
        If False, ``w`` is never ``-inf`` where ``z`` is finite.

    Returns
    -------
    hypothesis.strategies.SearchStrategy
    """
    st = _st()
    fams = list(PAIR_FAMILIES)
    if family is not None:
        if family not in PAIR_FAMILIES:
            raise ValueError(f"unknown pair family {family!r}; valid: {', '.join(PAIR_FAMILIES)}")
        fams = [family]

    @st.composite
    def build(draw: Any) -> tuple[Any, Any]:
        V = draw(_sizes(min_v, max_v))
        fam = draw(st.sampled_from(fams))
        z, w, _ = _build_pair(StableRNG(draw(_seeds())), V, fam, dtype, allow_infinite_kl)
        return z, w

    return build()


def row_and_token(
    min_v: int = 1,
    max_v: int = 64,
    *,
    dtype: DType = None,
    allow_masked: bool = True,
    allow_masked_token: bool = False,
) -> SearchStrategy[tuple[Any, int]]:
    """Hypothesis strategy for ``(row, token)``; the token is unmasked unless allowed.

    Parameters
    ----------
    min_v, max_v : int, optional
        Range of the row length.
    dtype : str, torch.dtype or None, optional
        As for :func:`logit_rows`.
    allow_masked : bool, optional
        Allow ``-inf`` entries in the row.
    allow_masked_token : bool, optional
        Allow the token to point at a ``-inf`` entry (its log-probability is ``-inf``).

    Returns
    -------
    hypothesis.strategies.SearchStrategy
    """
    st = _st()

    @st.composite
    def build(draw: Any) -> tuple[Any, int]:
        z = draw(logit_rows(min_v, max_v, dtype=dtype, allow_masked=allow_masked))
        z64 = _as64(z)
        choices = np.arange(z64.size) if allow_masked_token else np.flatnonzero(np.isfinite(z64))
        return z, int(choices[draw(st.integers(0, choices.size - 1))])

    return build()


def batches(
    min_n: int = 1,
    max_n: int = 8,
    min_v: int = 1,
    max_v: int = 300,
    *,
    dtype: DType = None,
    pairs: bool = False,
    family: str | None = None,
    allow_masked: bool = True,
    allow_infinite_kl: bool = True,
) -> SearchStrategy[Any]:
    """Hypothesis strategy for ``[N, V]`` batches with odd shapes and mixed row families.

    Parameters
    ----------
    min_n, max_n : int, optional
        Range of the number of rows.
    min_v, max_v : int, optional
        Range of the row length (sizes from :data:`ODD_SIZES` are favoured).
    dtype : str, torch.dtype or None, optional
        As for :func:`logit_rows`.
    pairs : bool, optional
        Return ``(z, w)`` built from :data:`PAIR_FAMILIES` instead of one array.
    family : str, optional
        Restrict every row to one family (row or pair family according to ``pairs``).
    allow_masked : bool, optional
        Allow ``-inf`` entries (single-array batches).
    allow_infinite_kl : bool, optional
        For pairs: if False, ``w`` is never ``-inf`` where ``z`` is finite.

    Returns
    -------
    hypothesis.strategies.SearchStrategy
        Of ``[N, V]`` arrays/tensors, or of ``(z, w)`` tuples when ``pairs`` is True.
    """
    st = _st()
    if not 1 <= min_n <= max_n:
        raise ValueError(f"need 1 <= min_n <= max_n, got {min_n}, {max_n}")
    if pairs:
        fams = list(PAIR_FAMILIES)
        if family is not None:
            fams = [f for f in _families(family, PAIR_FAMILIES)]
    else:
        valid = [f for f in ROW_FAMILIES if f != "elements" and (allow_masked or f != "masked")]
        fams = valid if family is None else list(_families(family, valid))
    n_odd = [v for v in (1, 2, 3, 5, 7, 8, 9, 16, 17, 31, 33) if min_n <= v <= max_n]
    n_strategy = st.integers(min_n, max_n)
    if n_odd:
        n_strategy = st.one_of(st.sampled_from(n_odd), n_strategy)

    @st.composite
    def build(draw: Any) -> Any:
        N = draw(n_strategy)
        V = draw(_sizes(min_v, max_v))
        root = StableRNG(draw(_seeds()))
        row_fams = draw(st.lists(st.sampled_from(fams), min_size=N, max_size=N))
        if pairs:
            items = [_build_pair(root.spawn(i), V, f, dtype, allow_infinite_kl)
                     for i, f in enumerate(row_fams)]
            return _stack([it[0] for it in items]), _stack([it[1] for it in items])
        rows = []
        for i, f in enumerate(row_fams):
            z, _ = _build_row(root.spawn(i), V, f, allow_masked)
            rows.append(cast(z, dtype))
        return _stack(rows)

    return build()


def temperatures(min_value: float = 0.05, max_value: float = 20.0) -> SearchStrategy[float]:
    """Hypothesis strategy for sampling temperatures :math:`T > 0`.

    Parameters
    ----------
    min_value, max_value : float, optional
        Range of the temperatures. Common values (1, 0.5, 0.6, 0.7, 0.8, 1.2, 2) inside it are
        favoured; others are drawn from the whole range.

    Returns
    -------
    hypothesis.strategies.SearchStrategy
    """
    st = _st()
    if not 0 < min_value <= max_value:
        raise ValueError(f"need 0 < min_value <= max_value, got {min_value}, {max_value}")
    common = [t for t in (1.0, 0.5, 0.6, 0.7, 0.8, 1.2, 2.0) if min_value <= t <= max_value]
    rng = st.floats(min_value=min_value, max_value=max_value, allow_nan=False,
                    allow_infinity=False)
    return st.one_of(st.sampled_from(common), rng) if common else rng
