"""Test setup: two fake CPU devices so data-parallel code paths run without accelerators,
no implicit rank promotion in jnp (every broadcast in the library is explicit; the
environment variable reaches the processes the tests start), and one compilation cache
for the session and those processes (`_compilation_cache`)."""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_NUMPY_RANK_PROMOTION", "raise")


def _compilation_cache():
  """A fresh XLA compilation cache directory for this run, removed at its end (nothing
  carries over between runs). The suite compiles the same small programs many times:
  every test builds its own jitted steps, and each process the resume and
  multi-process tests start compiles what the one before it did. A set
  JAX_COMPILATION_CACHE_DIR is left as it is (empty: no cache)."""
  if "JAX_COMPILATION_CACHE_DIR" in os.environ:
    return
  path = tempfile.mkdtemp(prefix="qinco-jax-tests-xla-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = path
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
  atexit.register(shutil.rmtree, path, ignore_errors=True)


_compilation_cache()
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 2)
