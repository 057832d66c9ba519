"""trmath: exact, cancellation-free policy divergences for LLM reinforcement learning.

The exact full-vocabulary reductions (:func:`logsumexp`, :func:`entropy`,
:func:`token_logprobs`, :func:`kl`, :func:`tv`, :func:`js`) run as fused C++ kernels on the CPU
(multi-threaded, no ``[N, V]`` temporaries) and as a chunked pure-torch backend elsewhere; both
are differentiable torch custom operators that work under ``torch.compile``.
:mod:`trmath.testing` holds the high-precision references and property strategies that prove
them, for users to verify their own code as well.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .exact import entropy, js, kl, logsumexp, token_logprobs, tv
from . import coarse as _coarse
from . import estimators as _estimators
from . import objectives as _objectives
from . import projections as _projections
from .coarse import *  # noqa: F401,F403  (names listed in coarse.__all__)
from .estimators import *  # noqa: F401,F403
from .objectives import *  # noqa: F401,F403
from .projections import *  # noqa: F401,F403


def num_threads() -> int:
    """Number of threads used by the CPU kernels (default: the CPUs this process may use)."""
    from ._backend import num_threads as _n

    return _n()


def set_num_threads(n: int) -> None:
    """Set the number of threads of the CPU kernels.

    Results are bitwise identical whatever the number of threads. The environment variable
    ``TRMATH_NUM_THREADS`` sets the initial value.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected an integer >= 1, got {n!r}")
    from ._backend import set_num_threads as _s

    _s(n)


__all__ = [
    "__version__",
    "entropy",
    "js",
    "kl",
    "logsumexp",
    "num_threads",
    "set_num_threads",
    "token_logprobs",
    "tv",
    *_coarse.__all__,
    *_estimators.__all__,
    *_objectives.__all__,
    *_projections.__all__,
]
