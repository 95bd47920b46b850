"""Test configuration: every test session sees 8 simulated CPU devices.

The flag must be set before JAX is imported anywhere, so it lives at the top of
conftest.py, which pytest imports before any test module.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# No persistent compilation cache (the lore-jax command turns it on by default): every
# test, and every process a test starts, compiles afresh.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "")

import jax  # noqa: E402
import pytest  # noqa: E402

NUM_DEVICES = 8


@pytest.fixture(scope="session")
def mesh() -> jax.sharding.Mesh:
    """A one-axis ('data') mesh over the 8 simulated devices."""
    assert jax.device_count() == NUM_DEVICES, jax.devices()
    return jax.make_mesh((NUM_DEVICES,), ("data",))
