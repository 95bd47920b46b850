"""Workarounds for one XLA backend, each behind a named helper, in one place.

* :func:`run_once`: programs that run once (initialisers) compiled without the CPU
  backend's LLVM optimisations.
* :func:`opaque_ints`: offsets XLA cannot constant-fold, so that same-size cuts out of
  a packed buffer or a stack of matrices share one compiled kernel.
* :func:`waits_for_each_step`: simulated CPU devices finish each step before the next.
* :func:`blas_single_threaded`: one BLAS thread per LAPACK call on the CPU backend.
* :func:`per_matrix`: factorizations of a stack of matrices one matrix at a time on CPU.

The CPU scheduler flag the command line sets lives in :mod:`lore_jax.cli`, which must
set it before JAX is imported.

Each is kept because a measurement shows it pays (the numbers are in its docstring);
the algorithm code calls them by name and reads the same without them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

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


def opaque_ints(values: Sequence[int], count: jax.Array) -> tuple[jax.Array, ...]:
    """``values`` as int32 scalars whose values XLA cannot see.

    XLA compiles a slice at a constant offset into a kernel of its own (the offset is
    part of it), and XLA:CPU compiles every distinct kernel (several ms each); slices of
    one size at runtime offsets share one. ``python -m benchmarks.workarounds`` measures
    it: on the update step of a 24-layer 256-wide MLP on 4 simulated devices, PowerSGD
    compiles to 17 kernels in 0.60 s with these offsets against 108 in 1.37 s without,
    GreedyLore to 54 in 1.51 s against 145 in 2.28 s (2026-12-07, 2 CPU cores).
    ``jax.lax.optimization_barrier`` on the offsets does not hide them.

    Args:
      values: Python ints (offsets, positions).
      count: a replicated int32 scalar that is never negative (a step count). The
        results are the outputs of a conditional on ``count >= 0`` whose other branch,
        never taken, returns zeros, so that XLA cannot replace it by its constants.

    Example:
      >>> import jax.numpy as jnp
      >>> [int(v) for v in opaque_ints([0, 3, 5], jnp.int32(0))]
      [0, 3, 5]
    """
    values = tuple(int(v) for v in values)
    if not values:
        return ()
    return jax.lax.cond(count >= 0,
                        lambda: tuple(jnp.int32(v) for v in values),
                        lambda: tuple(jnp.int32(0) for _ in values))


def waits_for_each_step(mesh: jax.sharding.Mesh) -> bool:
    """Whether a step on ``mesh`` should wait for its result before returning: when
    several of this process's devices on it are CPU devices.

    XLA:CPU runs simulated devices' collectives on one shared thread pool; several
    multi-device steps in flight at once can leave a collective waiting for a device
    whose work cannot get a thread (a deadlock seen on 2 cores). Accelerators, and one
    CPU device per process, return at once as jitted functions do.
    """
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    return len(local) > 1 and all(d.platform == "cpu" for d in local)


def blas_single_threaded() -> contextlib.AbstractContextManager:
    """On the CPU backend, one BLAS thread per call (restored on exit); elsewhere nothing.

    Simulated CPU devices each run on their own thread; a multi-threaded OpenBLAS inside
    every one of them (an SVD, a QR) oversubscribes the cores and runs 10-100x slower.
    """
    if jax.default_backend() != "cpu":
        return contextlib.nullcontext()
    try:
        import scipy.linalg  # noqa: F401  (load the LAPACK that jax's CPU kernels call)
        import threadpoolctl
    except ImportError:  # pragma: no cover - scikit-learn depends on it
        return contextlib.nullcontext()
    return threadpoolctl.threadpool_limits(1, user_api="blas")


def per_matrix(fn: Callable[..., jax.Array], *stacks: jax.Array) -> jax.Array:
    """``fn(*stacks)`` on stacks of matrices ``(k, ...)``; on CPU, one matrix per LAPACK call.

    jaxlib 0.10's CPU LAPACK kernels (SVD, QR, eigh, LU) split a batch over XLA's intra-op
    thread pool and block until it is done. When several devices of one process (e.g.
    simulated CPU devices) factorize at once they can occupy every pool thread while
    waiting, and the step deadlocks. ``lax.map`` keeps every call unbatched on CPU; other
    platforms keep the batched call.
    """
    def one_at_a_time(*stacks):
        return jax.lax.map(lambda xs: fn(*xs), stacks)

    return jax.lax.platform_dependent(*stacks, cpu=one_at_a_time, default=fn)
