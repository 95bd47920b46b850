"""Error feedback shared by every lore_jax transform: EF14, EF21, or none.

A compressed step on device i takes its local gradient ``g_i``, forms the vector it
compresses, ``x_i``, has the transform compress it (locally reconstructed: ``c_i``;
averaged over devices: ``c_bar``), and updates its memory:

====== ======================== ============================ ==========================
mode   x_i (compressed)         local memory after the step  output
====== ======================== ============================ ==========================
ef14   ``g_i + beta e_i``       ``e_i = x_i - c_i``          ``c_bar``
ef21   ``g_i - e_i``            ``e_i = e_i + c_i``          ``h = h + c_bar`` (global)
none   ``g_i``                  (no memory)                  ``c_bar``
====== ======================== ============================ ==========================

EF14 is Seide et al. (2014) / Stich et al. (2018) residual memory; EF21 is Richtárik et
al. (2021): each device tracks its gradient, and the replicated global tracker ``h``
(equal to the mean of the ``e_i``) is what the optimizer sees. A dense step is the
identity compressor: EF14 memory resets to zero and EF21 trackers become exact, which
is how GreedyLore's refresh steps reset (or, for EF21, initialise) the memory. EF14's
``beta`` (``error_decay``, default 1) below 1 forgets old residuals geometrically, as
SparseLoCo (Sarfi et al., 2025) does for the pseudo-gradients of infrequent
synchronisation.

The residual is always formed from the *local* reconstruction ``c_i``, before any
collective: the memory keeps what this device's own message left out, as EF14 and
EF21 require (Chen et al. 2025 for GreedyLore).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

ErrorFeedback = Literal["ef14", "ef21"] | None
MODES = ("ef14", "ef21", None)


def validate(error_feedback: object) -> ErrorFeedback:
    """Checks the ``error_feedback`` argument of a transform (outside ``jit``)."""
    if error_feedback not in MODES:
        raise ValueError(
            f"error_feedback={error_feedback!r} is not supported; use 'ef14' (residual "
            f"memory), 'ef21' (gradient trackers) or None (no error feedback)."
        )
    return error_feedback  # type: ignore[return-value]


def has_local(mode: ErrorFeedback) -> bool:
    """Whether the mode keeps a per-device memory ``e_i``."""
    return mode is not None


def has_global(mode: ErrorFeedback) -> bool:
    """Whether the mode keeps a replicated global tracker ``h``."""
    return mode == "ef21"


def validate_decay(error_decay: object, mode: ErrorFeedback) -> float:
    """Checks a transform's ``error_decay`` (outside ``jit``): a number in ``[0, 1]``, and
    1 unless the mode is EF14 (the only memory it applies to)."""
    if (isinstance(error_decay, bool) or not isinstance(error_decay, (int, float))
            or not 0.0 <= error_decay <= 1.0):
        raise ValueError(
            f"error_decay must be a number in [0, 1] (the share of the EF14 memory kept "
            f"from step to step), got {error_decay!r}."
        )
    if error_decay != 1.0 and mode != "ef14":
        raise ValueError(
            f"error_decay={error_decay!r} applies to EF14's memory only, but "
            f"error_feedback={mode!r}; use error_feedback='ef14' or error_decay=1.0."
        )
    return float(error_decay)


def compress_input(mode: ErrorFeedback, g: jax.Array, e: jax.Array | None,
                   decay: float = 1.0) -> jax.Array:
    """The vector device i compresses: ``g + decay * e`` (EF14), ``g - e`` (EF21) or ``g``.

    ``decay < 1`` forgets old residuals geometrically (SparseLoCo's error feedback, where
    the decayed memory takes the place of an outer momentum)."""
    if mode == "ef14":
        return g + e if decay == 1.0 else g + decay * e
    if mode == "ef21":
        return g - e
    return g


def local_update(
    mode: ErrorFeedback, e: jax.Array | None, x: jax.Array, c_local: jax.Array
) -> jax.Array | None:
    """The new per-device memory from the local reconstruction ``c_local`` of ``x``.

    Under EF14 a vector sent as it is (``c_local is x``: a dense leaf) leaves no
    residual, and its memory is written as zeros rather than computed as ``x - x``: the
    same values wherever ``x`` is finite (a step where it is not keeps the old memory),
    and no kernel per dense leaf in the compiled step.
    """
    if mode == "ef14":
        return jnp.zeros_like(x) if c_local is x else x - c_local
    if mode == "ef21":
        return e + c_local
    return e


def output(
    mode: ErrorFeedback, h: jax.Array | None, c_bar: jax.Array
) -> tuple[jax.Array, jax.Array | None]:
    """The transform's output and the new global tracker, from the mean reconstruction."""
    if mode == "ef21":
        h = h + c_bar
        return h, h
    return c_bar, h
