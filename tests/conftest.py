import gc
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def x64():
    """Run the test body with 64-bit floats enabled (for float64 references)."""
    with jax.enable_x64(True):
        yield


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module: the suite compiles thousands of programs in
    one process, which grew past 6 GB and once died with a segmentation fault inside XLA's compiler
    late in a full run (each module passes alone)."""
    yield
    jax.clear_caches()
    gc.collect()
