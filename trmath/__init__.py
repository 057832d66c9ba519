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


def set_buffer_cache(max_bytes: int) -> None:
    """Set how many bytes of freed large CPU outputs trmath keeps for reuse.

    Gradients of the exact reductions and the rows :func:`project_kl` returns are ``[N, V]``
    arrays. A fresh one of 100+ MB is mapped and zeroed by the operating system page by page on
    first touch, which costs about as much as a KL backward itself; trmath therefore takes them
    from a cache of buffers that earlier outputs returned when they were freed (like the CUDA
    caching allocator, for these outputs only). The default limit is 1 GiB, or the environment
    variable ``TRMATH_BUFFER_CACHE_MB``; ``0`` disables the cache and frees what it holds.
    """
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
        raise ValueError(f"max_bytes: expected an integer >= 0, got {max_bytes!r}")
    from ._backend import set_buffer_cache as _s

    _s(max_bytes)


def buffer_cache_info() -> dict:
    """The buffer cache's state: ``limit``, ``cached_bytes``, ``cached_buffers`` (free buffers
    held), ``reused`` and ``fresh`` (outputs served from the cache or newly allocated)."""
    from ._backend import buffer_cache_info as _i

    return _i()


def empty_buffer_cache() -> None:
    """Free the buffers the cache holds (outputs still alive keep their memory)."""
    from ._backend import empty_buffer_cache as _e

    _e()


__all__ = [
    "__version__",
    "buffer_cache_info",
    "empty_buffer_cache",
    "set_buffer_cache",
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
