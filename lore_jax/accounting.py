"""Exact communication accounting: 64-bit bit counters and collective sizes read from HLO.

**What "bits sent" counts.** Every lore_jax transform adds, each step, the payload one
device contributes to its collectives: the size of the buffer it all-reduces, or of its
own slot of an all-gather, every round of the step included (PowerSGD's two, GreedyLore's
tracking and projection rounds, the dense leaves). It is the convention of the
compression literature and does not depend on how the runtime carries the collective.
``bits_dense`` is what a dense all-reduce of the same gradients would contribute.

**What a node's link carries for it** (measured on an emulated cluster,
``benchmarks/cluster_bytes.py``; Gloo's ring algorithms, as NCCL's), for ``P`` nodes and a
payload of ``S`` bytes per device:

* all-reduce: each node sends and receives ``2 (P - 1) / P * S`` (``S`` at ``P = 2``,
  ``1.5 S`` at ``P = 4``): the ratio of compressed to dense traffic is the ratio of their
  bits;
* all-gather (top-k, QSGD, sign, greedy SVD): each node sends and receives ``(P - 1) * S``,
  which grows with ``P`` while a dense all-reduce stays below ``2 S``: an all-gathered
  compressor sends fewer bytes than dense only while ``(P - 1) S < 2 (P - 1) / P *
  S_dense``, i.e. below ``P = 2 S_dense / S`` nodes;
* on top of that, the wire carries each frame's headers (Ethernet, IP and TCP: 66 bytes
  per frame of at most 1,448 payload bytes, 4.6%), the ACK frames of the traffic coming
  the other way (about 2%), and about 0.4 to 2 KB per collective operation (the
  runtime's messages; on 2 nodes a 4-byte all-reduce moves 412 bytes). lore_jax packs
  each round into one buffer (:func:`lore_jax.collectives.pmean`), so a step is a few
  operations whatever the number of leaves: on the ``lm`` transformer the measured bytes
  were 1.05x the implied ones for dense, 1.06x to 1.12x for the compressors, at P = 2
  and 4. The training step's loss (one all-reduce of three floats) and JAX's
  coordination service (heartbeats, tens of bytes a second) are not counted.

Cumulative counts overflow int32 after 256 MiB, and JAX runs without 64-bit types by
default, so a counter is a ``uint32[2]`` array ``[high, low]`` that adds with carry:
exact up to 2**64 bits.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lore_jax import collectives

_WORD = 1 << 32


def zero_counter() -> jax.Array:
    """A fresh bit counter: ``uint32[2]`` holding (high word, low word) = 0."""
    return jnp.zeros((2,), jnp.uint32)


def add_bits(counter: jax.Array, nbits: int | jax.Array) -> jax.Array:
    """Adds ``nbits`` to a ``uint32[2]`` counter with carry.

    Args:
      counter: ``uint32[2]``, (high, low).
      nbits: a Python int (any size, split at trace time, so it is exact), a traced
        non-negative integer scalar below 2**32, or a ``uint32[2]`` counter (an
        increment of any size chosen at run time, e.g. by a phase).

    Returns:
      The updated ``uint32[2]`` counter.
    """
    if isinstance(nbits, (int, np.integer)):
        nbits = int(nbits)
        if nbits < 0:
            raise ValueError(f"nbits must be >= 0, got {nbits}.")
        hi_inc = np.uint32((nbits // _WORD) % _WORD)
        lo_inc = np.uint32(nbits % _WORD)
    elif jnp.shape(nbits) == (2,):
        hi_inc, lo_inc = nbits[0], nbits[1]
    else:
        hi_inc = np.uint32(0)
        lo_inc = jnp.asarray(nbits).astype(jnp.uint32)
    hi, lo = counter[0], counter[1]
    new_lo = lo + lo_inc
    carry = (new_lo < lo).astype(jnp.uint32)
    return jnp.stack([hi + hi_inc + carry, new_lo])


def choose_bits(options: Sequence[int], index: jax.Array) -> jax.Array:
    """The ``uint32[2]`` increment of ``options[index]`` bits, ``index`` traced (the
    branch a step runs), each option exact at any size; add it with :func:`add_bits`."""
    return jnp.stack([add_bits(zero_counter(), int(b)) for b in options])[index]


def counter_value(counter: Any) -> int:
    """The exact Python int held by a counter (any leading axes are taken from index 0).

    Per-device copies of a replicated counter (pmap's leading axis) are identical, so the
    first one is read.
    """
    arr = np.asarray(jax.device_get(counter)).reshape(-1, 2)[0]
    return int(arr[0]) * _WORD + int(arr[1])


def bits_of(shape: Iterable[int], dtype: Any = jnp.float32) -> int:
    """Bits of a dense array of this shape and dtype."""
    return int(np.prod(tuple(shape), dtype=np.int64)) * jnp.dtype(dtype).itemsize * 8


# --------------------------------------------------------------------------- HLO


_DTYPE_BITS = {
    "pred": 8, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "f16": 16, "bf16": 16,
    "s32": 32, "u32": 32, "f32": 32, "s64": 64, "u64": 64, "f64": 64,
}
_SHAPE_RE = re.compile(r"\b(pred|[su](?:8|16|32|64)|f16|bf16|f32|f64)\[([0-9,]*)\]")
_HEAD_RE = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(")
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                "collective-permute")


def _shape_bits(text: str) -> tuple[int, list[tuple[str, tuple[int, ...]]]]:
    total, shapes = 0, []
    for dt, dims in _SHAPE_RE.findall(text):
        shp = tuple(int(d) for d in dims.split(",") if d)
        total += int(np.prod(shp, dtype=np.int64)) * _DTYPE_BITS[dt]
        shapes.append((dt, shp))
    return total, shapes


def hlo_collectives(hlo_text: str) -> list[dict[str, Any]]:
    """Every collective op in an HLO module's text, with its computation and result shapes.

    Args:
      hlo_text: ``jax.jit(f).lower(...).compile().as_text()`` (the optimized module, in
        which XLA may have combined several collectives into one tuple-shaped op).

    Returns:
      One dict per op: ``op`` (e.g. ``"all-reduce"``), ``computation`` (the name of the
      HLO computation it sits in, so ops inside a ``conditional`` branch can be told
      apart), ``shapes`` (list of ``(dtype, dims)`` of the result) and ``bits`` (their
      total size). ``-start`` / ``-done`` async pairs are counted once, at the start.
    """
    out: list[dict[str, Any]] = []
    computation = None
    for line in hlo_text.splitlines():
        stripped = line.strip()
        head = _HEAD_RE.match(stripped)
        if head and stripped.endswith("{"):
            computation = head.group(1)
            continue
        m = re.match(r"^(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+([\w\-]+)\(", stripped)
        if not m:
            continue
        result_type, opname = m.group(1), m.group(2)
        base = opname.removesuffix("-start")
        if opname.endswith("-done") or base not in _COLLECTIVES:
            continue
        if opname.endswith("-start") and base == "all-gather":
            # all-gather-start's result is a tuple (operand, output): keep the output.
            _, shapes = _shape_bits(result_type)
            shapes = shapes[len(shapes) // 2:]
            bits = sum(int(np.prod(s, dtype=np.int64)) * _DTYPE_BITS[d] for d, s in shapes)
        else:
            bits, shapes = _shape_bits(result_type)
        out.append({"op": base, "computation": computation, "shapes": shapes, "bits": bits})
    return out


def collective_bits(hlo_text: str, op: str = "all-reduce") -> int:
    """Total result bits of every ``op`` collective in an HLO module's text."""
    return sum(c["bits"] for c in hlo_collectives(hlo_text) if c["op"] == op)


def communication(opt_state: Any) -> dict[str, int]:
    """Cumulative bits of every lore_jax transform inside an optax state, as Python ints.

    Returns:
      ``{"bits_sent": ..., "bits_dense": ...}``: the payload bits one device contributed to
      collectives so far, and the bits a dense all-reduce of the same gradients would have
      contributed. Their ratio is the compression rate. The bytes a node's link carries
      follow from the collective: ``2 (P - 1) / P`` times the payload for an all-reduce,
      ``P - 1`` times for an all-gather, plus framing (the module docstring).

    Works on any container of the states: optax chains and wrappers, an
    ``nnx.Optimizer``'s ``opt_state`` and the ``nnx.State`` of ``nnx.split``.
    """
    def counts_bits(node):
        return {"bits_sent", "bits_dense"} <= set(collectives.field_names(node) or ())

    def value(node, field):   # the array itself, or inside an nnx Variable
        return jax.tree.leaves(collectives.get_field(node, field))[0]

    sent = dense = 0
    for s in collectives.find_states(opt_state, counts_bits):
        sent += counter_value(value(s, "bits_sent"))
        dense += counter_value(value(s, "bits_dense"))
    return {"bits_sent": sent, "bits_dense": dense}


def hlo_conditional_branches(hlo_text: str) -> list[list[str]]:
    """Branch computation names of every ``conditional`` op, in branch-index order.

    ``jax.lax.switch(index, [f0, f1, f2], ...)`` lowers to one conditional whose
    ``branch_computations`` list ``f0, f1, f2`` in order, so collectives found in branch
    ``k`` (see :func:`hlo_collectives`) are those a step taking branch ``k`` performs.
    """
    out = []
    for m in re.finditer(r"branch_computations=\{([^}]*)\}", hlo_text):
        out.append([name.strip().lstrip("%") for name in m.group(1).split(",")])
    return out
