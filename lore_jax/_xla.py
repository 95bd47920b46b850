"""Workarounds for one XLA backend, each behind a named helper, in one place.

* :func:`run_once`: programs that run once (initialisers) compiled without the CPU
  backend's LLVM optimisations.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

#: Compiler options of programs that run once, per backend.
_RUN_ONCE_OPTIONS = {"cpu": {"xla_backend_optimization_level": 0}}


def run_once(fn: Callable[..., Any], *args: Any) -> Any:
    """``jax.jit(fn)(*args)``, for a program that runs once (an initialiser).

    On the CPU backend it is compiled at LLVM optimisation level 0: compilation is most
    of such a program's cost (a 4-block transformer's initialiser: 2.6 s instead of 5.2 s
    to compile, 0.09 s instead of 0.02 s to run, with two processes sharing two cores),
    and a multi-process job compiles it on every process before its first step. Results
    may differ from an optimised build in the last bit of a float.
    """
    jitted = jax.jit(fn)
    options = _RUN_ONCE_OPTIONS.get(jax.default_backend())
    traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(args))
    if options is None or traced:   # traced: part of a bigger program (eval_shape, jit)
        return jitted(*args)
    return jitted.lower(*args).compile(compiler_options=options)(*args)
