"""Test setup: two fake CPU devices so data-parallel code paths run without accelerators,
and no implicit rank promotion in jnp (every broadcast in the library is explicit; the
environment variable reaches the processes the tests start)."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_NUMPY_RANK_PROMOTION", "raise")
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 2)
