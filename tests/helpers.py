"""Helpers shared by the tests that run a gradient transform on the 8-device 'data' mesh.

Gradients are stacked per device (leading axis 8) and sharded along 'data'; one step
runs ``tx.update`` on each device's slice inside ``shard_map`` and returns the
(replicated) update and the new state.
"""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lore_jax


def put(tree, mesh):
    """Shards a tree of per-device arrays (leading axis 8) along the 'data' axis."""
    return jax.device_put(tree, NamedSharding(mesh, P("data")))


def shard_step(tx, mesh, state):
    """A jitted ``(g, state) -> (update, state)`` step of ``tx`` on every device of ``mesh``."""
    specs = lore_jax.state_specs(state, "data")

    def step(g, s):
        return tx.update(jax.tree.map(lambda x: x[0], g), s)

    return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P("data"), specs),
                                 out_specs=(P(), specs)))


def init_and_step(tx, params, mesh):
    """The sharded initial state of ``tx`` for ``params`` and its :func:`shard_step`."""
    state = lore_jax.sharded_init(tx, params, mesh)
    return state, shard_step(tx, mesh, state)


def switch_bits(hlo_text: str) -> tuple[int, list[int]]:
    """All-reduce bits of a compiled step holding one GreedyLore ``lax.switch``.

    Returns ``(outside, [warm_up, refresh, compressed])``: the bits all-reduced on every
    step (outside the switch) and in each of its three branches.
    """
    cols = lore_jax.hlo_collectives(hlo_text)
    (branches,) = [b for b in lore_jax.accounting.hlo_conditional_branches(hlo_text)
                   if len(b) == 3]
    outside = sum(c["bits"] for c in cols if c["computation"] not in branches)
    return outside, [sum(c["bits"] for c in cols if c["computation"] == b) for b in branches]


def greedylore_bases(state) -> list:
    """The :class:`lore_jax.GreedyLoreBasis` of every group of same-shape matrices in a
    greedylore state (stacked: basis ``(k, a, a)``, factor ``(k, b, r)``), in group order."""
    return [s for s in state.compressor_state if isinstance(s, lore_jax.GreedyLoreBasis)]


def with_greedylore_stack(state, basis=None, factor=None):
    """``state`` with its one group's bases ``(k, a, a)`` and factors ``(k, b, r)``
    replaced (``None``: kept). A state that keeps only its leading basis columns
    (range tracking's Ritz vectors, ``(k, a, c)``) gets the leading ``c`` of ``basis``."""
    (group,) = state.compressor_state
    if basis is not None:
        basis = basis[..., :group.basis.shape[-1]]
    group = group._replace(basis=group.basis if basis is None else basis,
                           factor=group.factor if factor is None else factor)
    return state._replace(compressor_state=(group,))
