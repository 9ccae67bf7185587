"""How a numba kernel is chosen: compiled, or its plain-Python body (STYLE §2: the tests run both)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def chosen(kernel: Any, jit: bool) -> Callable[..., Any]:
    """The compiled kernel, or its plain-Python body (``py_func``; the function itself when
    numba is disabled with NUMBA_DISABLE_JIT=1)."""
    function: Callable[..., Any] = kernel if jit else getattr(kernel, "py_func", kernel)
    return function
