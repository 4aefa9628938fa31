"""The compilers for hardware this machine does not have, kept out of the user's
environment.

Compiling for a TPU needs libtpu, for an NVIDIA GPU the CUDA plugin of JAX (plus
`ptxas` and libdevice). Installed into the environment, libtpu slows every CPU start
of JAX (about 19 s, with TPU initialisation errors): so `install(kind)` puts the
plugin that matches the installed jax into a cache folder of its own
(`$QINCO_JAX_CACHE/aot/<kind>-jax<version>`, about 0.7 GB for TPU, 0.6 GB for GPU),
and the compile runs in a child process that finds it on `PYTHONPATH`, with
`JAX_PLATFORMS=cpu` so that JAX never looks for a real accelerator there. Where the
plugin is already importable (a TPU VM, a GPU host, an environment with
`jax[tpu]`/`jax[cuda12]`), it is used directly.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile

from qinco_jax import data

_MODULES = {"tpu": "libtpu", "gpu": "jax_cuda12_plugin"}
# libtpu's start-up reads these (on a real TPU VM, from the metadata server); set for
# compiling only, they keep it from querying and from printing warnings. libtpu also
# takes a lock file so that one process at a time drives the chips: compiling drives
# none, so several compiles may run at once.
_QUIET_TPU = {"TPU_ACCELERATOR_TYPE": "v5litepod-4", "TPU_WORKER_HOSTNAMES": "localhost",
              "TPU_SKIP_MDS_QUERY": "1", "TF_CPP_MIN_LOG_LEVEL": "3",
              "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
_QUIET_GPU = {"TF_CPP_MIN_LOG_LEVEL": "3"}


class PluginMissing(RuntimeError):
  """The compiler plugin of a target is neither importable nor in the cache."""


def kind_of(platform: str) -> str:
  if platform not in _MODULES:
    raise ValueError(f"platform must be one of {sorted(_MODULES)}, got {platform!r}")
  return platform


def importable(kind: str) -> bool:
  """The plugin is importable in this process (no install needed)."""
  return importlib.util.find_spec(_MODULES[kind_of(kind)]) is not None


def cache_dir(kind: str) -> str:
  """Where `install` puts the plugin for the installed jax version."""
  return os.path.join(data.default_cache_dir(), "aot",
                      f"{kind_of(kind)}-jax{importlib.metadata.version('jax')}")


def cached(kind: str) -> bool:
  return os.path.isfile(os.path.join(cache_dir(kind), ".complete"))


def requirements(kind: str) -> list[str]:
  """The pip requirements of the plugin that matches the installed jax (read from
  jax's own metadata: its `tpu` and `cuda12-local` extras)."""
  version = importlib.metadata.version("jax")
  if kind_of(kind) == "tpu":
    for r in importlib.metadata.requires("jax") or []:
      if r.startswith("libtpu") and 'extra == "tpu"' in r:
        return [r.split(";")[0].strip()]
    return ["libtpu"]
  return [f"jax-cuda12-plugin=={version}", f"jax-cuda12-pjrt=={version}"]


def _pip(args: list[str], verbose: bool):
  cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check",
         *args]
  r = subprocess.run(cmd, capture_output=not verbose, text=True)
  if r.returncode:
    tail = (r.stderr or r.stdout or "")[-2000:] if not verbose else ""
    raise RuntimeError(f"installing {' '.join(args[2:])} failed (pip exit {r.returncode})"
                       + (f": {tail}" if tail else ""))


def install(kind: str, verbose: bool = True) -> str:
  """Installs the plugin for `kind` ("tpu" or "gpu") into `cache_dir(kind)` (never
  into the running environment) and returns that folder. Idempotent; a folder left
  by an interrupted install is replaced."""
  dest = cache_dir(kind)
  if cached(kind):
    return dest
  os.makedirs(os.path.dirname(dest), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{kind}-", dir=os.path.dirname(dest))
  try:
    reqs = requirements(kind)
    if verbose:
      print(f"installing {' '.join(reqs)} into {dest} (once)", file=sys.stderr, flush=True)
    _pip(["--target", tmp, *reqs], verbose)
    if kind == "gpu":  # ptxas and libdevice, in the version the plugin asks for
      meta = importlib.metadata.Distribution.at(
          next(os.path.join(tmp, p) for p in os.listdir(tmp)
               if p.startswith("jax_cuda12_plugin") and p.endswith(".dist-info")))
      nvcc = [re.split(r";", r)[0].strip() for r in (meta.requires or [])
              if r.startswith("nvidia-cuda-nvcc")] or ["nvidia-cuda-nvcc-cu12"]
      _pip(["--target", tmp, *nvcc], verbose)
    open(os.path.join(tmp, ".complete"), "w").close()
    if os.path.exists(dest):
      shutil.rmtree(dest)  # an earlier, incomplete install (no .complete marker)
    os.replace(tmp, dest)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  return dest


def child_env(kind: str, base: dict[str, str] | None = None) -> dict[str, str]:
  """The environment of a child process that compiles with the cached plugin."""
  env = dict(os.environ if base is None else base)
  paths = [cache_dir(kind)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
  env["PYTHONPATH"] = os.pathsep.join(paths)
  env["JAX_PLATFORMS"] = "cpu"  # compile only: never initialise a local accelerator
  for k, v in (_QUIET_TPU if kind == "tpu" else _QUIET_GPU).items():
    env.setdefault(k, v)
  return env


def missing_message(kind: str) -> str:
  what = {"tpu": "libtpu (the TPU compiler)", "gpu": "JAX's CUDA plugin (the GPU compiler)"}
  extra = {"tpu": "jax[tpu]", "gpu": "jax[cuda12]"}
  version = importlib.metadata.version("jax")
  return (f"compiling for {kind.upper()} needs {what[kind]}, which is not installed: run "
          f"`qinco-compile --install_plugin={kind}` once (it goes into {cache_dir(kind)}, "
          f"not into your environment), or pip install \"{extra[kind]}=={version}\" in a "
          "separate environment")
