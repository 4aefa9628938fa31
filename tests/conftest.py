"""Test setup: two fake CPU devices so data-parallel code paths run without accelerators."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 2)
