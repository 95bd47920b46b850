"""``compressed_mean``: the data-parallel mean of gradients sent through any compressor.

One step, per gradient leaf, on device ``i`` of ``N`` (the arrows of the data flow):

  local gradient ``g_i`` -> error feedback input ``x_i`` -> ``compress`` -> collective ->
  ``decompress`` -> mean ``c_bar`` -> error feedback output -> base optimizer.

Linear compressors (shared randomness or shared factors) are all-reduced: the mean of the
payloads is decompressed once. The others are all-gathered: every device decompresses
the ``N`` payloads and averages them. Either way the output is identical on every device.

Matrix compressors with ``groups`` (PowerSGD, random projection, greedy SVD) take the
middle three arrows for the whole model at once (``_send_grouped``): same-shape matrices
stacked, each collective round packed into one buffer and the dense leaves into one
more, so a step's collectives do not grow with the number of leaves. The others take
them leaf by leaf (``_send_leaves``), the payloads of all leaves again packed into one
collective.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lore_jax import _xla, accounting, collectives, subspace
from lore_jax import error_feedback as ef
from lore_jax.compressors.base import DENSE, Compressor, MatrixGroups, work_dtype


class CompressedMeanState(NamedTuple):
    """State of :func:`compressed_mean`."""

    count: jax.Array
    """int32 step counter (replicated); the step's keys fold it into ``key``."""
    key: jax.Array
    """uint32[2] PRNG key (replicated), fixed; the compressor state's initial key and
    per-step keys are derived from it by ``fold_in``."""
    error: Any
    """Per-device error-feedback memory ``e_i``: params-shaped leaves with a leading axis
    of length 1, float32 or wider (``None`` without error feedback)."""
    tracker: Any
    """EF21 global tracker ``h`` (replicated, params-shaped, float32 or wider), else ``None``."""
    compressor_state: Any
    """Compressor state (replicated; PowerSGD's warm start, GreedyLore's bases). Matrix
    compressors with ``groups``: a tuple with one stacked state per group of same-shape
    matrices (``None`` if stateless), in the order of the groups' first leaves, kept
    stacked from step to step; others: per leaf, like the parameters."""
    bits_sent: jax.Array
    """uint32[2] bits this device put into collectives so far."""
    bits_dense: jax.Array
    """uint32[2] bits a dense all-reduce of the same gradients would have sent."""
    nonfinite_steps: jax.Array
    """int32 number of steps whose mean was not finite (and left the state as it was)."""

    PER_DEVICE_FIELDS = ("error",)


class _Piece(NamedTuple):
    """One array a leaf is compressed as (the leaf, or one of its matrices)."""

    leaf: int
    compressor: Compressor
    key: jax.Array
    x: jax.Array
    state: Any


def _exchange(pieces: list[_Piece], axis_name: collectives.AxisName,
              count: jax.Array) -> list[tuple[jax.Array, jax.Array, Any, int | jax.Array]]:
    """Compress -> collective -> decompress for every piece of every leaf at once.

    Linear compressors' payloads are averaged, the others' all-gathered and each
    device's decompressed and averaged; either way the payloads of all pieces travel
    packed into one buffer per dtype (:func:`lore_jax.collectives.pmean`,
    :func:`~lore_jax.collectives.all_gather_packed`), so a step's collectives do not
    grow with the number of leaves.

    Returns per piece ``(c_local, c_bar, state, nbits)``: this device's reconstruction,
    the mean over devices of the reconstructions (identical on every device), the new
    compressor state and the bits this device sent.
    """

    def mean(tree):   # a compressor's inner rounds (PowerSGD's first factor)
        return collectives.pmean(tree, axis_name, count)

    sent = [p.compressor.compress(p.key, p.x, p.state, mean) for p in pieces]
    linear = [n for n, p in enumerate(pieces) if p.compressor.linear]
    other = [n for n, p in enumerate(pieces) if not p.compressor.linear]
    means = dict(zip(linear, mean([sent[n][0] for n in linear]), strict=True))
    gathered = dict(zip(other, collectives.all_gather_packed(
        [sent[n][0] for n in other], axis_name, count), strict=True))
    out = []
    for n, (p, (payload, ctx)) in enumerate(zip(pieces, sent, strict=True)):
        q = p.compressor
        c_local = q.decompress(payload, ctx)
        nbits = q.payload_bits(payload, ctx)
        if q.linear:
            out.append((c_local, q.decompress(means[n], ctx),
                        q.next_state(p.state, means[n], ctx), nbits))
            continue
        c_bar = jnp.mean(jax.vmap(lambda g, q=q, ctx=ctx: q.decompress(g, ctx))(gathered[n]),
                         axis=0)
        if not isinstance(nbits, int):
            # A variable-length all-gather pads every device's slot to the longest
            # message; the gathered payloads give its length on every device.
            nbits = jnp.max(jax.vmap(lambda g, q=q, ctx=ctx: q.payload_bits(g, ctx))(
                gathered[n]))
        out.append((c_local, c_bar, p.state, nbits))
    return out


class _Leaf(NamedTuple):
    """How one leaf is sent: by which compressor, as which matrices (``view``)."""

    compressor: Compressor
    view: subspace.MatrixView | None   # None: the leaf as it is


def _leaf_plans(compressor: Compressor, tree: Any, weight_dimension_numbers: Any,
                dense: Any = None) -> list[_Leaf]:
    """Matrix compressors get each leaf's matrices (non-matrices go dense); others the
    leaf; leaves the ``dense`` mask marks go dense."""
    flags = _dense_flags(dense, tree)
    if not compressor.matrix:
        return [_Leaf(DENSE if d else compressor, None) for d in flags]
    return [_Leaf(DENSE if v is None or d else compressor, v)
            for v, d in zip(subspace.resolve_views(tree, weight_dimension_numbers), flags,
                            strict=True)]


def _dense_flags(dense: Any, tree: Any) -> list[bool]:
    """Evaluates an optax-style ``dense`` mask on ``tree`` into one bool per leaf."""
    n = len(jax.tree.leaves(tree))
    if dense is None:
        return [False] * n
    mask = dense(tree) if callable(dense) else dense
    try:
        flags = jax.tree.leaves(jax.tree.map(lambda _, m: bool(m), tree, mask))
    except ValueError as e:
        raise ValueError(
            "dense must be a pytree of bools with the structure of the parameters (True "
            "keeps a leaf dense), or a callable returning one; got a mask whose structure "
            f"does not match: {e}"
        ) from e
    return flags


def _in_groups(compressor: Compressor, leaf: _Leaf) -> bool:
    """Whether a leaf's matrices go into ``compressor.groups``' stacks (not dense)."""
    return (compressor.groups is not None and leaf.compressor is not DENSE
            and compressor.groups.view((leaf.view.rows, leaf.view.cols)) is not None)


def _matrix_keys(key: jax.Array, view: subspace.MatrixView | None) -> list[jax.Array]:
    """One key per matrix of a leaf (the leaf's own key when it holds one)."""
    if view is None or view.batch == 1:
        return [key]
    return [jax.random.fold_in(key, j) for j in range(view.batch)]


def _pieces(x: jax.Array, view: subspace.MatrixView | None) -> list[jax.Array]:
    """The arrays a leaf is compressed as: itself, or its matrices ``(rows, cols)``."""
    if view is None:
        return [x]
    return list(subspace.arrange(x, view))


def _unpieces(parts: list[jax.Array], view: subspace.MatrixView | None) -> jax.Array:
    return parts[0] if view is None else subspace.unarrange(jnp.stack(parts), view)


def _init_leaf(leaf: _Leaf, key: jax.Array, x: Any) -> Any:
    """The compressor state of one leaf: one per matrix (a tuple when it holds several)."""
    states = [leaf.compressor.init(k, p.shape, p.dtype)
              for k, p in zip(_matrix_keys(key, leaf.view), _pieces(x, leaf.view), strict=True)]
    state = states[0] if len(states) == 1 else tuple(states)
    return collectives.vary_like(state, x)


def _send_leaves(plans: list[_Leaf], keys: list[jax.Array], xs: list[jax.Array],
                 cstates: list[Any], axis_name: collectives.AxisName, count: jax.Array
                 ) -> list[tuple[jax.Array, jax.Array, Any, list]]:
    """Compress -> collective -> decompress for every matrix (or the whole) of every leaf
    (:func:`_exchange`).

    Returns per leaf ``(c_local, c_bar, cstate, nbits)``; ``nbits`` lists each piece's.
    """
    pieces = []
    for i, (leaf, key, x, cstate) in enumerate(zip(plans, keys, xs, cstates, strict=True)):
        parts = _pieces(x, leaf.view)
        states = [cstate] if len(parts) == 1 else list(cstate)
        pieces += [_Piece(i, leaf.compressor, k, p, st) for k, p, st in
                   zip(_matrix_keys(key, leaf.view), parts, states, strict=True)]
    results = _exchange(pieces, axis_name, count)
    out = []
    for i, leaf in enumerate(plans):
        mine = [r for p, r in zip(pieces, results, strict=True) if p.leaf == i]
        c_local, c_bar, new_states, nbits = (list(r) for r in zip(*mine, strict=True))
        new_state = new_states[0] if len(mine) == 1 else tuple(new_states)
        out.append((_unpieces(c_local, leaf.view), _unpieces(c_bar, leaf.view), new_state,
                    nbits))
    return out


class _Slot(NamedTuple):
    """Where one matrix of a leaf goes: its group and position there, or dense."""

    group: Hashable | None   # (a, b, model axes), or (leaf, piece); None: sent dense
    index: int               # position in its group's stack, or among the dense pieces
    view: subspace.MatrixView | None


def _route(groups: MatrixGroups, plans: list[_Leaf], pieces: list[list[jax.Array]],
           axis_name: collectives.AxisName, by_shape: bool
           ) -> tuple[list[list[_Slot]], dict, list]:
    """Assigns every matrix of every leaf to a stack of same-shape matrices (or dense);
    with ``by_shape=False`` every matrix is a stack of its own.

    Returns ``(slots, members, dense)``: per leaf the slot of each of its pieces, per
    group the ``(leaf, piece)`` pairs in stack order, and the dense ``(leaf, piece)``
    pairs in order.
    """
    slots, members, dense = [], {}, []
    for i, (leaf, leaf_pieces) in enumerate(zip(plans, pieces, strict=True)):
        row = []
        for j, piece in enumerate(leaf_pieces):
            view = groups.view(piece.shape) if leaf.compressor is not DENSE else None
            if view is None:
                row.append(_Slot(None, len(dense), None))
                dense.append((i, j))
                continue
            axes = collectives.mesh_order(collectives.varying_axes(piece) - {axis_name})
            key = (view.a, view.b, axes) if by_shape else (i, j)
            row.append(_Slot(key, len(members.setdefault(key, [])), view))
            members[key].append((i, j))
        slots.append(row)
    return slots, members, dense


def _state_structure(tree: Any) -> Any:
    """The structure of ``tree`` with flax ``nnx.Variable`` wrappers removed, at whose
    leaf positions the compressor states (pytrees of their own) are kept: an
    ``nnx.Optimizer`` would turn a Variable holding a pytree into an ``nnx.State``,
    and the state's type would change between steps."""
    nnx = sys.modules.get("flax.nnx")
    if nnx is None:   # no flax Variables exist
        return jax.tree.structure(tree)

    def is_variable(x):
        return isinstance(x, nnx.Variable)

    return jax.tree.structure(jax.tree.map(
        lambda v: v.get_value() if is_variable(v) else v, tree, is_leaf=is_variable))


def _stack(trees: list[Any]) -> Any:
    return None if trees[0] is None else jax.tree.map(lambda *t: jnp.stack(t), *trees)


class _Stacks(NamedTuple):
    """A model's matrices as stacks of same-shape matrices (:func:`_stack_groups`)."""

    pieces: list[list[jax.Array]]   # per leaf, the arrays it is sent as
    slots: list[list[_Slot]]        # per leaf, where each piece went
    order: list[Hashable]           # the groups, in stack order
    keys: list[jax.Array]           # per group, (k, 2) per-matrix keys
    ms: list[jax.Array]             # per group, (k, a, b) float32
    states: list[Any]               # per group, its stacked state (or None)
    dense: list[jax.Array]          # the pieces sent dense, in order


def _grouping(groups: MatrixGroups, plans: list[_Leaf], xs: list[Any],
              axis_name: collectives.AxisName, by_shape: bool) -> tuple:
    """Every leaf cut into its matrices and routed (:func:`_route`):
    ``(pieces, slots, members, dense)``."""
    pieces = [_pieces(x, leaf.view) for leaf, x in zip(plans, xs, strict=True)]
    return (pieces, *_route(groups, plans, pieces, axis_name, by_shape))


def _group_keys(base: jax.Array, plans: list[_Leaf], members: dict, order: list
                ) -> list[jax.Array]:
    """Per group, the ``(k, 2)`` keys of its matrices in stack order, those of
    :func:`_matrix_keys` with the leaf keys ``fold_in(base, i)``, drawn for the whole
    model in one vectorized ``fold_in`` (two where a leaf holds several matrices): one
    ``fold_in`` per leaf compiles to one threefry loop per leaf."""
    pairs = [pair for g in order for pair in members[g]]
    leaf_ids, piece_ids = (np.array(c, np.uint32) for c in zip(*pairs, strict=True))
    keys = jax.vmap(jax.random.fold_in, (None, 0))(base, leaf_ids)
    several = np.array([plans[i].view.batch > 1 for i, _ in pairs])
    if several.any():
        keys = jnp.where(several[:, None], jax.vmap(jax.random.fold_in)(keys, piece_ids),
                         keys)
    ends = np.cumsum([len(members[g]) for g in order])
    return [keys[e - len(members[g]):e] for g, e in zip(order, ends, strict=True)]


def _stack_groups(groups: MatrixGroups, plans: list[_Leaf], base: jax.Array,
                  xs: list[jax.Array], states: tuple, axis_name: collectives.AxisName,
                  by_shape: bool) -> _Stacks:
    """Cuts every leaf into its matrices and stacks the same-shape ones (:func:`_route`);
    ``base`` is the step's key for the compressor (:func:`_step_bases`), ``states`` are
    the groups' (stacked, in group order)."""
    pieces, slots, members, dense = _grouping(groups, plans, xs, axis_name, by_shape)
    order = list(members)
    return _Stacks(
        pieces, slots, order,
        keys=_group_keys(base, plans, members, order) if order else [],
        ms=[jnp.stack([subspace.orient(pieces[i][j], slots[i][j].view)
                       for i, j in members[g]]) for g in order],
        states=list(states), dense=[pieces[i][j] for i, j in dense])


def _init_groups(compressor: Compressor, plans: list[_Leaf], key: jax.Array,
                 leaves: list[Any], axis_name: collectives.AxisName, by_shape: bool) -> tuple:
    """The groups' compressor states, each the stack of its matrices' ``init`` (each
    matrix's key as when compressed one at a time), in group order; a state varies over
    the mesh axes its group's shards do."""
    pkeys = [_matrix_keys(jax.random.fold_in(key, i), leaf.view)
             for i, leaf in enumerate(plans)]
    pieces, _, members, _ = _grouping(compressor.groups, plans, leaves, axis_name, by_shape)

    def group_state(pairs):
        state = _stack([compressor.init(pkeys[i][j], pieces[i][j].shape, pieces[i][j].dtype)
                        for i, j in pairs])
        i, j = pairs[0]
        return collectives.vary_like(state, pieces[i][j], axis_name)

    return tuple(group_state(pairs) for pairs in members.values())


def _round_trip(compressor: Compressor, st: _Stacks, axis_name: collectives.AxisName,
                count: jax.Array) -> tuple[list, list, list, int]:
    """Compress -> collective -> decompress for every group at once, each round (inner
    ones included) in one packed collective (:func:`lore_jax.collectives.pmean`:
    one buffer, so one op however many groups).

    Returns ``(c_local, c_bar, states, bits)``: per group the local and mean
    reconstructions and the new stacked states, and the bits the groups' payloads took.
    """
    groups = compressor.groups

    def mean(tree):   # one all-reduce per round for the whole model
        return collectives.pmean(tree, axis_name, count)

    payloads, shared = groups.compress(st.keys, st.ms, st.states, mean)
    c_local = [groups.decompress(p, sh) for p, sh in zip(payloads, shared, strict=True)]
    states = st.states
    if compressor.linear:
        mean_payloads = mean(payloads)
        c_bar = [groups.decompress(p, sh) for p, sh in zip(mean_payloads, shared, strict=True)]
        if groups.next_state is not None:
            states = [s_ if s_ is None else groups.next_state(s_, mp)
                      for s_, mp in zip(states, mean_payloads, strict=True)]
    else:
        gathered = collectives.all_gather_packed(payloads, axis_name, count)
        c_bar = [jnp.mean(jax.vmap(lambda p, sh=sh: groups.decompress(p, sh))(g), axis=0)
                 for g, sh in zip(gathered, shared, strict=True)]
    bits = sum(m.shape[0] * groups.bits(m.shape[-2], m.shape[-1]) for m in st.ms)
    return c_local, c_bar, states, bits


def _send_grouped(compressor: Compressor, plans: list[_Leaf], base: jax.Array,
                  xs: list[jax.Array], states: tuple, axis_name: collectives.AxisName,
                  count: jax.Array, by_shape: bool = True
                  ) -> tuple[list[tuple[jax.Array, jax.Array, list]], tuple, int | jax.Array,
                             list[jax.Array]]:
    """Compress -> collective -> decompress for a whole model, same-shape matrices stacked.

    Every group of same-shape matrices is compressed as one ``(k, a, b)`` stack
    (:class:`~lore_jax.compressors.base.MatrixGroups`) and every round carries all
    groups at once (:func:`_round_trip`), or the compressor runs its rounds itself
    (``groups.communicate``: GreedyLore's phases). The dense pieces are packed into one
    all-reduce of their own (:func:`lore_jax.collectives.pmean`; the HLO tests and
    ``benchmarks/collectives.py`` count the ops). Every matrix's two reconstructions are
    cut out of its group's stacks at positions XLA cannot fold
    (:func:`lore_jax._xla.opaque_ints`), so that a group's cuts are one kernel.

    Returns per leaf ``(c_local, c_bar, nbits)`` with the same keys and results as one
    matrix at a time (``nbits`` counts the leaf's dense pieces), the groups' new states,
    the bits of their payloads, and the arrays every leaf's ``c_bar`` is cut from or is:
    per group its ``(k, a, b)`` mean stack, then the dense pieces' means.
    """
    groups = compressor.groups
    st = _stack_groups(groups, plans, base, xs, states, axis_name, by_shape)
    if groups.communicate is not None:
        c_local, c_bar, states, bits = groups.communicate(st.ms, st.states, count)
    else:
        c_local, c_bar, states, bits = _round_trip(compressor, st, axis_name, count)
    dense_bar = collectives.pmean(st.dense, axis_name, count)
    where = {g: n for n, g in enumerate(st.order)}
    positions = _xla.opaque_ints(range(max((m.shape[0] for m in st.ms), default=0)), count)

    def cut(stack, slot, dtype):
        return subspace.unorient(
            jax.lax.dynamic_index_in_dim(stack, positions[slot.index], keepdims=False),
            slot.view, dtype)

    def piece_out(i, j, slot):
        x = st.pieces[i][j]
        if slot.group is None:
            return x, dense_bar[slot.index], accounting.bits_of(x.shape, x.dtype)
        n = where[slot.group]
        return cut(c_local[n], slot, x.dtype), cut(c_bar[n], slot, x.dtype), 0

    out = []
    for i, leaf in enumerate(plans):
        parts = [piece_out(i, j, slot) for j, slot in enumerate(st.slots[i])]
        loc, bar, nbits = (list(r) for r in zip(*parts, strict=True))
        out.append((_unpieces(loc, leaf.view), _unpieces(bar, leaf.view), nbits))
    return out, tuple(states), bits, list(c_bar) + list(dense_bar)


def _check_state_fits(updates: Any, state: CompressedMeanState, init_fn: Any,
                      transform: str = "compressed_mean",
                      groups: Callable[[], str] | None = None) -> None:
    """Raises a ValueError naming the gradient leaves the state was not initialised for.

    Compares, leaf by leaf, the per-parameter parts of the state (error memory, tracker,
    compressor state) with those ``init`` would give for parameters shaped like
    ``updates`` (abstractly: nothing is computed); a grouped compressor state is
    compared group by group, ``groups()`` describing the gradients' groups.
    """
    want = jax.eval_shape(init_fn, jax.tree.map(
        lambda g: jax.ShapeDtypeStruct(np.shape(g), jnp.result_type(g)), updates))
    for field in ("error", "tracker", "compressor_state"):
        expected = dict(_shapes(getattr(want, field)))
        present = dict(_shapes(getattr(state, field)))
        missing = [k for k in expected if k not in present]
        extra = [k for k in present if k not in expected]
        wrong = [k for k in expected if k in present and expected[k] != present[k]]
        if not (missing or extra or wrong):
            continue
        if field == "compressor_state" and groups is not None:
            def firsts(tree):
                return [tuple(np.shape(jax.tree.leaves(s_)[0])) for s_ in tree
                        if jax.tree.leaves(s_)]

            raise ValueError(
                f"{transform}: the gradients do not match the parameters the state was "
                f"initialised with (compressor_state, one per group of same-shape matrices: "
                f"the gradients' groups are {groups()}; the state's group states have shapes "
                f"{firsts(state.compressor_state)}, the gradients need "
                f"{firsts(want.compressor_state)}). Initialise the optimizer with "
                f"parameters of the same structure and shapes as the gradients."
            )
        problems = [f"{k} has shape {present[k]} in the state, the gradient needs "
                    f"{expected[k]}" for k in wrong[:3]]
        if missing:
            problems.append(f"the state has no {', '.join(missing[:4])}")
        if extra:
            problems.append(f"the gradients have no leaf for the state's {', '.join(extra[:4])}")
        raise ValueError(
            f"{transform}: the gradients do not match the parameters the state was "
            f"initialised with ({field}: {'; '.join(problems)}). Initialise the optimizer "
            f"with parameters of the same structure and shapes as the gradients."
        )


def _describe_groups(compressor: Compressor, plans: list[_Leaf], tree: Any) -> str:
    """The same-shape groups of ``tree``'s matrices, for messages: ``1 of 16x64: ['a'];
    2 of 16x32: ['b'], ['c']`` (groups in order of their first leaf)."""
    members: dict[tuple, list[tuple[str, int]]] = {}
    for (path, _), leaf in zip(jax.tree_util.tree_flatten_with_path(tree)[0], plans,
                               strict=True):
        if _in_groups(compressor, leaf):
            v = compressor.groups.view((leaf.view.rows, leaf.view.cols))
            members.setdefault((v.a, v.b), []).append((jax.tree_util.keystr(path),
                                                       leaf.view.batch))
    return "; ".join(f"{sum(n for _, n in m)} of {a}x{b}: {', '.join(p for p, _ in m)}"
                     for (a, b), m in members.items()) or "none"


def _shapes(tree: Any) -> list[tuple[str, tuple]]:
    return [(jax.tree_util.keystr(p), tuple(np.shape(x)))
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _finite(outs: list, errors: list, model_axes: tuple,
            check_memory: bool) -> tuple[jax.Array, jax.Array | None]:
    """Whether the output is finite and whether this device's new memory is (``None``
    when not checked), each agreed over ``model_axes`` (the shards of a leaf), so that
    replicated state stays replicated (XLA combines the two reductions into one
    all-reduce).

    ``outs`` are the arrays whose finiteness is the output's: the outputs themselves, or
    (:func:`_checked_outputs`) the stacks they are cut from. ``check_memory=False`` where
    every entry of every input reaches the output (matrix compressors with ``groups``
    multiply each matrix by dense factors, and the dense pieces are sent as they are),
    so that a finite output means finite memory: the memory's reductions, one per leaf,
    would double the step's HLO.
    """
    finite = collectives.agree(collectives.all_finite(outs), model_axes)
    if not check_memory:
        return finite, None
    return finite, collectives.agree(collectives.all_finite(errors), model_axes)


def compressed_mean(
    compressor: Compressor,
    *,
    axis_name: collectives.AxisName = "data",
    error_feedback: ef.ErrorFeedback = "ef14",
    key: Any = None,
    weight_dimension_numbers: Any = None,
    batch_by_shape: bool = True,
    dense: Any = None,
    error_decay: float = 1.0,
) -> optax.GradientTransformationExtraArgs:
    """The mean over devices of compressed gradients, with error feedback.

    Each device ``i`` holds its local gradient ``g_i``. Per leaf, it forms the error
    feedback input ``x_i`` (``g_i + e_i`` for EF14, ``g_i - e_i`` for EF21, ``g_i`` without),
    compresses it with :class:`~lore_jax.compressors.Compressor` ``Q`` and communicates: a
    linear ``Q`` is all-reduced, ``c_bar = decompress(mean_i payload_i)``; any other is
    all-gathered, ``c_bar = mean_i decompress(payload_i)``. The memory is updated from the
    local reconstruction ``c_i = decompress(payload_i)``
    (:mod:`lore_jax.error_feedback`) and the output, identical on every device, is
    ``c_bar`` (EF14, none) or the EF21 tracker ``h <- h + c_bar``. This is distributed
    compressed gradient descent (DCGD) of Khirirat, Feyzmahdavian and Johansson (2018)
    when ``error_feedback=None``, and its error-compensated form with ``"ef14"``.

    Dtypes: the memory and tracker are float32 (or wider); the compressor sees ``x_i`` in
    the gradient's dtype, so the identity compressor sends bfloat16 gradients as
    bfloat16, and EF14 carries the rounding over to the next step.

    Randomness: each step's keys are folded from ``key`` and the step count; linear
    compressors use the shared (replicated) one, the others fold in the device index as
    well, so the compression noise is independent across devices and steps; each leaf
    folds in its position.

    Non-finite steps: if the mean ``c_bar`` has a non-finite entry (every device sees the
    same), the error memory, the EF21 tracker, the compressor state and the step count
    keep their old values, ``nonfinite_steps`` is incremented (bits are still counted, as
    they were sent) and the non-finite output is returned, so that the base optimizer
    wrapped in ``optax.apply_if_finite`` skips the parameter update: put it *after* the
    mean, ``optax.chain(compressed_mean(...), optax.apply_if_finite(optax.adam(lr), k))``,
    where it sees the same (reduced) values on every device. Wrapped *around* the chain
    it tests each device's local gradient, so the device with the NaN skips the
    collectives the others enter: under ``shard_map`` the step does not trace, and
    :func:`lore_jax.state_specs`, :func:`lore_jax.sharded_init` and
    :func:`lore_jax.data_parallel` refuse it (and ``optax.MultiSteps`` around the chain,
    which runs the collectives on every micro-step while counting one in ``k``: use
    :func:`lore_jax.multi_steps`); under ``jax.pmap`` nothing can check it, and it hangs.
    Nor can ``axis_name=None`` under ``jax.pmap`` be checked: every device then applies
    its own gradient. A device whose new memory alone is non-finite (a NaN that top-k
    did not select) keeps its old memory.

    Matrices: a matrix compressor (``compressor.matrix``: PowerSGD, random projection,
    greedy SVD) compresses every matrix of a leaf, as ``weight_dimension_numbers`` cut
    it (optax's convention; see :func:`lore_jax.greedylore`), with its own state, and
    vectors and biases are sent dense. Other compressors see whole leaves. With
    ``compressor.groups`` (every low-rank compressor of lore_jax), the whole model is
    compressed at once: same-shape matrices are stacked (``batch_by_shape``) so that one
    batched matmul / QR / SVD serves each shape, and each collective round, PowerSGD's
    inner one included, packs every matrix's payload into one all-reduce (all-gather for
    greedy SVD); the dense leaves are packed into one more all-reduce. The collectives
    per step do not grow with the number of leaves. The
    keys, states and results are those of compressing one matrix at a time.
    ``batch_by_shape=False`` keeps the packed rounds but computes matrix by matrix,
    which avoids stacking copies (a faster step on simulated CPU devices in
    ``benchmarks/collectives.py``, a slower compile).

    Model-sharded parameters: each device compresses the shard it holds and only
    ``axis_name`` is communicated; compressor states and trackers of a shard vary over
    the mesh axes the shard does, and whether a step was finite is agreed over them.

    Bits: ``bits_sent`` adds each leaf's ``payload_bits`` (the buffers this device
    all-reduces or all-gathers, inner rounds included); for a data-dependent length
    behind an all-gather (Bernoulli with indices) it adds the longest message of the
    step, to which a variable-length all-gather pads every device's slot.

    Args:
      compressor: a :class:`~lore_jax.compressors.Compressor`.
      axis_name: the data axis of the enclosing ``jax.shard_map`` / ``jax.pmap`` (default
        ``"data"``); ``None`` for one device (no collectives).
      error_feedback: ``"ef14"`` (default), ``"ef21"`` or ``None``.
      key: int seed, ``jax.random.key`` or uint32[2] key for the compressors' randomness
        (default: seed 0). Must be the same on every device.
      weight_dimension_numbers: which axes of each leaf form the matrix, for matrix
        compressors (as in :func:`lore_jax.greedylore`); default: the Flax conventions.
      batch_by_shape: stack same-shape matrices into one batched compression (matrix
        compressors with ``groups``); ``False``: one matrix at a time, rounds still packed.
      dense: optax-style mask, a pytree of bools like the parameters (or a callable
        ``params -> mask``); ``True`` sends a leaf dense (embeddings, output heads).
      error_decay: ``beta`` in ``[0, 1]``, EF14 only: the device compresses ``g_i + beta
        e_i`` (default 1, EF14 itself); below 1 old residuals fade geometrically, as in
        SparseLoCo's error feedback on :func:`lore_jax.diloco`'s pseudo-gradients.

    Returns:
      An ``optax.GradientTransformationExtraArgs``. ``update(grads, state, params=None)``
      takes each device's local gradients (float leaves of any shape) and returns their
      compressed mean. Initialise the state with :func:`lore_jax.sharded_init` and pass
      :func:`lore_jax.state_specs` of it to ``shard_map``: the error memory is per device.

    Raises:
      TypeError: a bad ``compressor`` or ``batch_by_shape``, or (at trace time) a
        non-float gradient leaf.
      ValueError: an unknown ``error_feedback`` or a bad ``key``; at trace time, an
        ``axis_name`` that is not bound, gradients already summed over it, gradients
        that do not match the parameters the state was initialised with, or an error
        memory that is not this device's own row (a state not laid out by
        :func:`lore_jax.shard_state` / :func:`lore_jax.sharded_init`).

    References:
      Khirirat, Feyzmahdavian, Johansson, "Distributed learning with compressed gradients",
      arXiv:1806.06573, 2018; Seide et al., "1-bit stochastic gradient descent ...",
      Interspeech 2014 (EF14); Richtarik, Sokolov, Fatkhullin, "EF21: A new, simpler,
      theoretically better, and practically faster error feedback", NeurIPS 2021.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from lore_jax import compressors
      >>> from lore_jax.compressed_mean import compressed_mean
      >>> tx = optax.chain(compressed_mean(compressors.top_k(2), axis_name=None),
      ...                  optax.sgd(0.1))
      >>> params = {"w": jnp.ones(8)}
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.arange(8.0)}, state)
      >>> updates["w"]
      Array([-0. , -0. , -0. , -0. , -0. , -0. , -0.6, -0.7], dtype=float32)
    """
    if not isinstance(compressor, Compressor):
        raise TypeError(
            f"compressor must be a lore_jax.compressors.Compressor (e.g. "
            f"compressors.top_k(k)), got {type(compressor).__name__}."
        )
    if not isinstance(batch_by_shape, bool):
        raise TypeError(f"batch_by_shape must be True or False, got {batch_by_shape!r}.")
    return pipeline(compressor, axis_name=axis_name, error_feedback=error_feedback, key=key,
                    weight_dimension_numbers=weight_dimension_numbers,
                    batch_by_shape=batch_by_shape, dense=dense, error_decay=error_decay)


def _checked_outputs(mode: ef.ErrorFeedback, outs: list, stacks: list | None) -> list:
    """The arrays to check for the output's finiteness: the per-group stacks every output
    leaf is cut from and the dense means (``stacks``, from :func:`_send_grouped`), where
    the output is such a cut in float32; the outputs themselves otherwise (leaf
    compressors; EF21, whose output adds the tracker; narrower dtypes, where the cast
    can overflow). A model's few stacks compile to a few reductions, its leaves to one
    or more each.
    """
    if stacks is None or ef.has_global(mode):
        return outs
    return stacks + [o for o in outs if o.dtype not in (jnp.float32, jnp.float64)]


class _Step(NamedTuple):
    """One step's per-leaf quantities, flattened like the gradients."""

    errors: list[Any]      # e_i, without the leading axis (None without local memory)
    trackers: list[Any]    # h (None without EF21)
    inputs: list[Any]      # x_i, float32 or wider


def _error_feedback_in(mode: ef.ErrorFeedback, leaves: list[jax.Array], treedef: Any,
                       state: CompressedMeanState, decay: float = 1.0) -> _Step:
    """Error-feedback input ``x_i = g_i + decay e_i`` (EF14), ``g_i - e_i`` (EF21), or
    ``g_i``."""
    absent = [None] * len(leaves)
    errors = [e[0] for e in treedef.flatten_up_to(state.error)] \
        if ef.has_local(mode) else absent
    trackers = treedef.flatten_up_to(state.tracker) if ef.has_global(mode) else absent
    inputs = [ef.compress_input(mode, g, e, decay) for g, e in zip(leaves, errors, strict=True)]
    return _Step(errors, trackers, inputs)


def _step_bases(state: CompressedMeanState, axis_name: collectives.AxisName
                ) -> tuple[jax.Array, jax.Array]:
    """This step's two keys: the shared one (linear compressors) and the device's own
    (the others); leaf ``i``'s key folds ``i`` into its compressor's."""
    step_key = jax.random.fold_in(jax.random.fold_in(state.key, 1), state.count)
    device = 0 if axis_name is None else jax.lax.axis_index(axis_name)
    return (jax.random.fold_in(step_key, 0),
            jax.random.fold_in(jax.random.fold_in(step_key, 1), device))


def _send(compressor: Compressor, plans: list[_Leaf], bases: tuple[jax.Array, jax.Array],
          leaves: list[jax.Array], step: _Step, cstate: Any, cstate_def: Any,
          axis_name: collectives.AxisName, count: jax.Array, batch_by_shape: bool
          ) -> tuple[list[tuple[jax.Array, jax.Array, list]], Any, list, list | None]:
    """Compress -> collective -> decompress: per leaf ``(c_local, c_bar, nbits)``, the new
    compressor state (laid out as the state holds it: per leaf, or per group of
    :func:`_send_grouped`), the bits of the groups, a list of at most one, and the
    grouped path's mean stacks (:func:`_checked_outputs`; ``None`` leaf by leaf)."""
    groups = compressor.groups
    full = groups is not None and groups.communicate is not None
    # Compressed in the gradient's dtype (the memory absorbs the rounding), unless the
    # compressor runs its rounds itself, in float32.
    sends = [x if full and _in_groups(compressor, leaf) else x.astype(g.dtype)
             for x, g, leaf in zip(step.inputs, leaves, plans, strict=True)]
    if groups is None:
        keys = [jax.random.fold_in(bases[0] if leaf.compressor.linear else bases[1], i)
                for i, leaf in enumerate(plans)]
        sent = _send_leaves(plans, keys, sends, cstate_def.flatten_up_to(cstate), axis_name,
                            count)
        return ([(loc, bar, n) for loc, bar, _, n in sent],
                cstate_def.unflatten([cs for _, _, cs, _ in sent]), [], None)
    base = bases[0] if compressor.linear else bases[1]
    sent, states, bits, stacks = _send_grouped(compressor, plans, base, sends, cstate,
                                               axis_name, count, batch_by_shape)
    return sent, states, [bits], stacks


def _error_feedback_out(mode: ef.ErrorFeedback, leaves: list[jax.Array], step: _Step,
                        sent: list) -> tuple[list, list, list]:
    """The memory from the local reconstruction and the output from the mean one
    (:mod:`lore_jax.error_feedback`): ``(outs, errors, trackers)``, per leaf."""
    outs, errors, trackers = [], [], []
    for g, e, x, h, (c_local, c_bar, _) in zip(
            leaves, step.errors, step.inputs, step.trackers, sent, strict=True):
        e = ef.local_update(mode, e, x, c_local)
        out, h = ef.output(mode, h, c_bar)
        outs.append(out.astype(g.dtype))
        errors.append(e)
        trackers.append(h)
    return outs, errors, trackers


def _add_bits(counter: jax.Array, amounts: list) -> jax.Array:
    """``counter`` plus every amount: Python ints summed exactly, traced ones in turn."""
    counter = accounting.add_bits(counter, sum(b for b in amounts if isinstance(b, int)))
    for b in amounts:
        if not isinstance(b, int):
            counter = accounting.add_bits(counter, b)
    return counter


def _next_state(mode: ef.ErrorFeedback, state: CompressedMeanState, treedef: Any,
                errors: list, trackers: list, cstate: Any, bits: list, finite: jax.Array,
                error_finite: jax.Array | None, dense_bits: int) -> CompressedMeanState:
    """The new state; on a non-finite step the old memory, tracker, compressor state and
    count, and one more ``nonfinite_steps`` (a device whose new memory alone is not
    finite, ``error_finite`` false, keeps its old memory). Bits are counted either way.

    One conditional for all of it: a select per leaf, or a conditional per field, would
    each recompute the flag's sum over every leaf (XLA copies it into each fusion), a
    step's HLO growing with the number of leaves or fields."""
    new_error = state.error
    if ef.has_local(mode):
        old = treedef.flatten_up_to(state.error)
        new_error = treedef.unflatten([e[None].astype(o.dtype)
                                       for e, o in zip(errors, old, strict=True)])
    new_tracker = treedef.unflatten(trackers) if ef.has_global(mode) else state.tracker

    def advance(old_error):
        error = new_error
        if ef.has_local(mode) and error_finite is not None:
            error = jax.lax.cond(error_finite, lambda n, o: n, lambda n, o: o,
                                 new_error, old_error)
        return (optax.safe_increment(state.count), error, new_tracker, cstate,
                state.nonfinite_steps)

    def hold(old_error):
        return (state.count, old_error, state.tracker, state.compressor_state,
                state.nonfinite_steps + 1)

    count, error, tracker, kept, nonfinite = jax.lax.cond(finite, advance, hold, state.error)
    return CompressedMeanState(
        count=count, key=state.key, error=error, tracker=tracker, compressor_state=kept,
        bits_sent=_add_bits(state.bits_sent, bits),
        bits_dense=accounting.add_bits(state.bits_dense, dense_bits),
        nonfinite_steps=nonfinite,
    )


def pipeline(
    compressor: Compressor,
    *,
    axis_name: collectives.AxisName,
    error_feedback: ef.ErrorFeedback,
    key: Any,
    weight_dimension_numbers: Any,
    batch_by_shape: bool,
    dense: Any,
    transform: str = "compressed_mean",
    error_decay: float = 1.0,
) -> optax.GradientTransformationExtraArgs:
    """The data flow every lore_jax compressing transform runs, one named phase per
    arrow: :func:`_error_feedback_in` -> :func:`_send` (compress -> collective ->
    decompress) -> :func:`_error_feedback_out` -> :func:`_next_state` (the non-finite
    rule and the bit counts). :func:`compressed_mean` documents the arguments;
    ``transform`` names the public transform in error messages (``"greedylore"`` runs
    its compressor through this same pipeline)."""
    mode = ef.validate(error_feedback)
    decay = ef.validate_decay(error_decay, mode)
    collectives.check_axis_name(axis_name, transform)
    base_key = collectives.as_key(key)

    def plans_for(tree):
        return _leaf_plans(compressor, tree, weight_dimension_numbers, dense)

    def init_fn(params):
        leaves, treedef = jax.tree.flatten(params)
        plans = plans_for(params)

        def zeros(x, lead=()):
            return collectives.vary_like(jnp.zeros(lead + x.shape, work_dtype(x.dtype)), x)

        error = treedef.unflatten([zeros(x, (1,)) for x in leaves]) \
            if ef.has_local(mode) else None
        tracker = treedef.unflatten([zeros(x) for x in leaves]) if ef.has_global(mode) else None
        init_key = jax.random.fold_in(base_key, 0)
        if compressor.groups is not None:
            cstate = _init_groups(compressor, plans, init_key, leaves, axis_name,
                                  batch_by_shape)
        else:
            cstate = _state_structure(params).unflatten([
                _init_leaf(leaf, jax.random.fold_in(init_key, i), x)
                for i, (leaf, x) in enumerate(zip(plans, leaves, strict=True))])
        return CompressedMeanState(
            count=jnp.zeros([], jnp.int32), key=base_key, error=error, tracker=tracker,
            compressor_state=cstate, bits_sent=accounting.zero_counter(),
            bits_dense=accounting.zero_counter(), nonfinite_steps=jnp.zeros([], jnp.int32),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        collectives.check_floating(updates, transform)
        collectives.check_local_gradients(updates, axis_name, transform)
        collectives.check_per_device_state(state, axis_name, transform)
        plans = plans_for(updates)
        _check_state_fits(updates, state, init_fn, transform,
                          None if compressor.groups is None
                          else lambda: _describe_groups(compressor, plans, updates))
        leaves, treedef = jax.tree.flatten(updates)
        step = _error_feedback_in(mode, leaves, treedef, state, decay)
        sent, cstate, group_bits, stacks = _send(
            compressor, plans, _step_bases(state, axis_name), leaves, step,
            state.compressor_state, _state_structure(updates), axis_name, state.count,
            batch_by_shape)
        outs, errors, trackers = _error_feedback_out(mode, leaves, step, sent)
        finite, error_finite = _finite(_checked_outputs(mode, outs, stacks), errors,
                                       collectives.model_axes(updates, axis_name),
                                       check_memory=compressor.groups is None)
        bits = [b for *_, nbits in sent for b in nbits] + group_bits
        new_state = _next_state(
            mode, state, treedef, errors, trackers, cstate, bits, finite, error_finite,
            sum(accounting.bits_of(g.shape, g.dtype) for g in leaves))
        return treedef.unflatten(outs), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
