"""The XLA:CPU workarounds of lore_jax._xla do what their docstrings say."""

import jax
import jax.numpy as jnp
import numpy as np

from lore_jax import _xla


def test_opaque_ints_are_the_values_and_cuts_at_them_share_a_kernel():
    """The values come back; XLA sees no constants, so same-size cuts at them are one
    kernel however many there are, where each cut at a constant offset adds one."""
    from benchmarks.collectives import distinct_kernels

    def kernels(n, opaque):
        offsets = [5 * i for i in range(n)]

        def cuts(x, count):
            starts = _xla.opaque_ints(offsets, count) if opaque else offsets
            return [jax.lax.dynamic_slice_in_dim(x, s, 5) * 2.0 for s in starts]

        x = jnp.arange(20.0)
        fn = jax.jit(cuts)
        for o, g in zip(offsets, fn(x, jnp.int32(0)), strict=True):
            np.testing.assert_array_equal(g, np.arange(o, o + 5.0) * 2.0)
        return distinct_kernels(fn.lower(x, jnp.int32(0)).compile().as_text())

    assert [int(v) for v in _xla.opaque_ints([0, 3, 5], jnp.int32(7))] == [0, 3, 5]
    assert kernels(4, opaque=True) == kernels(2, opaque=True)
    assert kernels(4, opaque=False) == kernels(2, opaque=False) + 2


def test_steps_wait_only_where_several_cpu_devices_share_a_process(mesh):
    assert _xla.waits_for_each_step(mesh)
    one = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    assert not _xla.waits_for_each_step(one)


def test_blas_is_single_threaded_inside_the_context_and_restored_after():
    import scipy.linalg  # noqa: F401  (the context loads it: count its BLAS from the start)
    import threadpoolctl

    def blas_threads():
        return [p["num_threads"] for p in threadpoolctl.threadpool_info()
                if p["user_api"] == "blas"]

    before = blas_threads()
    with _xla.blas_single_threaded():
        assert all(n == 1 for n in blas_threads())
    assert blas_threads() == before
