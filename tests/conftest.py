"""Test configuration: every test session sees 8 simulated CPU devices.

The flag must be set before JAX is imported anywhere, so it lives at the top of
conftest.py, which pytest imports before any test module.
"""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache per test session (or the directory CI gives for
# both of its sessions), shared by the processes the tests start, as the lore-jax
# command shares ~/.cache/lore_jax/xla: the many short runs of the same small models
# compile each program once, and the cache's path is tested as users run it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="lore_jax-test-xla-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")

import jax  # noqa: E402
import pytest  # noqa: E402

NUM_DEVICES = 8


@pytest.fixture(scope="session")
def mesh() -> jax.sharding.Mesh:
    """A one-axis ('data') mesh over the 8 simulated devices."""
    assert jax.device_count() == NUM_DEVICES, jax.devices()
    return jax.make_mesh((NUM_DEVICES,), ("data",))
