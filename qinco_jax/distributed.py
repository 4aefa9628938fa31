"""Several processes (hosts) in one run: start-up, agreement, barriers, lost peers.

A multi-process JAX run is one program started once per process (per host on a TPU
pod or a GPU cluster; several per machine for tests). Every process calls
`initialize` first; afterwards `jax.devices()` lists the devices of all processes,
`jax.local_devices()` this process's own.

How qinco-jax uses it (docs/design.md, "Several processes"):
  * Every collective (a jitted step over the global mesh, `agree`, `broadcast`) is
    entered by every process in the same order.
  * Files of a training run are written by process 0 alone, as host-local arrays,
    and the other processes wait at a `barrier` (the coordination service's, with a
    timeout we choose) around such work, so no host needs a shared filesystem and no
    process runs ahead into a collective while process 0 writes.
  * What process 0 decides (validation numbers, time-budget plans, what a resumed
    checkpoint holds) reaches the others through `broadcast`, so every process takes
    the same branch.
  * A process that dies makes the others stop with `PeerLostError` naming it, within
    about `heartbeat_timeout_s`.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
# Cluster managers whose environment jax.distributed.initialize() reads by itself.
_AUTO_ENV = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_NTASKS",
             "OMPI_COMM_WORLD_SIZE")
HEARTBEAT_TIMEOUT_S = 30  # a silent peer is declared lost after this long
BARRIER_TIMEOUT_S = 24 * 3600  # process 0's file writes and evaluation can be long
_heartbeat_s = HEARTBEAT_TIMEOUT_S


class PeerLostError(RuntimeError):
  """Another process of a multi-process run stopped (killed, crashed, unreachable)."""


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *,
               heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S) -> bool:
  """Joins a multi-process run, or does nothing for a single process.

  Each argument falls back to its environment variable (`JAX_COORDINATOR_ADDRESS`,
  `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`). Without a coordinator address, TPU pods,
  SLURM and Open MPI launches are detected by JAX itself; otherwise the run is a
  single process. CPU processes exchange collectives through gloo.

  Args:
    coordinator_address: "host:port" of process 0's coordination service.
    num_processes: processes in the run (all hosts together).
    process_id: this process's index, 0..num_processes-1.
    heartbeat_timeout_s: seconds of silence after which a peer counts as lost (the
      other processes then stop with an error naming it).
  Returns:
    True when this is a multi-process run.
  """
  if jax.distributed.is_initialized():
    return jax.process_count() > 1
  env = os.environ
  address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
  n = _int_or_none(num_processes, "JAX_NUM_PROCESSES", "num_processes")
  pid = _int_or_none(process_id, "JAX_PROCESS_ID", "process_id")
  global _heartbeat_s
  _heartbeat_s = int(heartbeat_timeout_s)
  if address is None:
    if n not in (None, 1) or pid not in (None, 0):
      raise ValueError(f"num_processes={n}, process_id={pid} need a coordinator address "
                       "(--coordinator_address=HOST:PORT or JAX_COORDINATOR_ADDRESS)")
    if not any(k in env for k in _AUTO_ENV):
      return False  # a single process
    # TPU pod / SLURM / MPI auto-detection
    jax.distributed.initialize(heartbeat_timeout_seconds=_heartbeat_s)
    return jax.process_count() > 1
  if n is None or pid is None:
    if not any(k in env for k in _AUTO_ENV):
      raise ValueError(f"coordinator address {address!r} given without the number of "
                       "processes and this process's id: pass --num_processes and "
                       "--process_id (or JAX_NUM_PROCESSES and JAX_PROCESS_ID)")
  if n is not None and n < 1:
    raise ValueError(f"num_processes must be >= 1, got {n}")
  if n is not None and pid is not None and not 0 <= pid < n:
    raise ValueError(f"process_id must be in [0, {n}) (num_processes={n}), got {pid}")
  if n == 1:
    return False
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes
  jax.distributed.initialize(address, n, pid, heartbeat_timeout_seconds=_heartbeat_s)
  return True


def _int_or_none(v, env_name: str, name: str) -> int | None:
  if v is None or (isinstance(v, int) and v < 0):  # flags use -1 for "unset"
    v = os.environ.get(env_name) or None
  if v is None:
    return None
  try:
    return int(v)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be an integer, got {v!r}") from None


def define_flags():
  """Adds --coordinator_address, --num_processes, --process_id to absl's flags."""
  from absl import flags
  flags.DEFINE_string("coordinator_address", None,
                      "multi-process runs: HOST:PORT of process 0 (default "
                      "$JAX_COORDINATOR_ADDRESS; TPU pods and SLURM are detected)")
  flags.DEFINE_integer("num_processes", None,
                       "multi-process runs: number of processes (default $JAX_NUM_PROCESSES)")
  flags.DEFINE_integer("process_id", None,
                       "multi-process runs: this process's index (default $JAX_PROCESS_ID)")


def initialize_from_flags() -> bool:
  """`initialize` with the values of the flags `define_flags` added."""
  from absl import flags
  F = flags.FLAGS
  return initialize(F.coordinator_address, F.num_processes, F.process_id)


def is_main() -> bool:
  """True on process 0 (the one that writes files, logs and prints)."""
  return jax.process_index() == 0


def multi() -> bool:
  return jax.process_count() > 1


def host(tree):
  """Replicated device arrays -> NumPy (also when not fully addressable)."""
  def get(a):
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
      a = a.addressable_data(0)
    return np.asarray(a)
  return jax.tree.map(get, tree)


_n_broadcasts = 0  # broadcasts so far (the same on every process: they meet in order)


def broadcast(tree):
  """Process 0's values of a pytree of arrays, on every process (NumPy leaves).

  Every process passes a tree of the same structure, shapes and dtypes (only process
  0's values are used). A no-op for a single process.
  """
  tree = host(tree)
  if not multi():
    return tree
  from jax.experimental import multihost_utils
  global _n_broadcasts
  _n_broadcasts += 1
  # Meet first: a device collective must not wait long for a busy peer (gloo's first
  # exchange gives up after 30 s), a coordination-service barrier can.
  barrier(f"broadcast-{_n_broadcasts}")
  with peer_guard("broadcast"):
    out = multihost_utils.broadcast_one_to_all(tree, is_source=is_main())
  return jax.tree.map(lambda a, like: np.asarray(a, like.dtype), out, tree)


def broadcast_json(obj: Any) -> Any:
  """Process 0's JSON-able value on every process (others may pass anything)."""
  if not multi():
    return obj
  raw = np.frombuffer(json.dumps(obj).encode(), np.uint8) if is_main() else np.zeros(0, np.uint8)
  n = int(broadcast(np.asarray(len(raw), np.int64)))
  buf = np.zeros(n, np.uint8)
  buf[: len(raw)] = raw[:n]
  return json.loads(bytes(broadcast(buf)).decode())


def agree(v: int) -> int:
  """Process 0's integer on every process (plans must match for the collectives)."""
  return int(broadcast(np.asarray(v, np.int64)))


def barrier(name: str, timeout_s: float = BARRIER_TIMEOUT_S):
  """Waits until every process reaches the barrier `name` (names must be unique per
  run and reached in the same order). Uses the coordination service, not a device
  collective, so it can wait for long work on one process."""
  if not multi():
    return
  from jax._src import distributed as _dist  # the coordination-service client
  client = _dist.global_state.client
  assert client is not None  # multi(): jax.distributed is initialized
  with peer_guard(f"barrier {name!r}"):
    client.wait_at_barrier(f"qinco_jax/{name}", int(timeout_s * 1000))


def lost_processes(wait_s: float = 0.0) -> list[int] | None:
  """The processes the coordination service no longer hears from, or None when it
  cannot tell within `wait_s` seconds (it only declares a peer lost after the
  heartbeat timeout, and cannot answer at all when the coordinator is the one lost)."""
  if not multi():
    return []
  result: list = []

  def ask():
    try:
      from jax._src import distributed as _dist
      ids = list(range(jax.process_count()))
      result.append(sorted(set(ids) - set(_dist.global_state.client.get_live_nodes(ids))))
    except Exception:
      result.append(None)

  t = threading.Thread(target=ask, daemon=True)
  t.start()
  t.join(wait_s)
  return result[0] if result else None


def _who_was_lost() -> str:
  me, n = jax.process_index(), jax.process_count()
  if n == 2:
    return f"process {1 - me}"  # the only peer
  lost = lost_processes(wait_s=_heartbeat_s + 5)
  if lost:
    return "process " + ", ".join(map(str, lost))
  return "process 0 (the coordinator)" if lost is None and me != 0 else "a peer process"


@contextlib.contextmanager
def peer_guard(what: str) -> Iterator[None]:
  """Turns a failed cross-process operation into a PeerLostError naming the lost
  process, when another process is the cause."""
  try:
    yield
  except PeerLostError:
    raise
  except Exception as e:  # JaxRuntimeError from gloo or the coordination service
    if not multi() or not _looks_like_peer_failure(e):
      raise
    raise PeerLostError(
        f"process {jax.process_index()} of {jax.process_count()} lost {_who_was_lost()} "
        f"during {what} ({type(e).__name__}: {str(e).splitlines()[0][:300]}). Restart "
        "every process with --config.resume=True to continue from the last "
        "checkpoint.") from e


@contextlib.contextmanager
def exit_on_error() -> Iterator[None]:
  """For scripts. In a multi-process run an error ends this process at once (exit
  status 1) after printing it, so that its peers learn within the heartbeat timeout
  that it is gone (otherwise it would wait for them at JAX's shutdown barrier while
  they wait for it). A lost peer prints one line. A single process re-raises."""
  try:
    yield
  except BaseException as e:
    if not multi() or isinstance(e, SystemExit) and not e.code:
      raise
    sys.stdout.flush()
    if isinstance(e, PeerLostError):
      print(f"error: {e}", file=sys.stderr, flush=True)
    else:
      import traceback
      traceback.print_exc()
      print(f"error: process {jax.process_index()} failed; the other processes stop "
            f"within {_heartbeat_s} s", file=sys.stderr, flush=True)
    sys.stderr.flush()
    os._exit(1)


_PEER_WORDS = ("gloo", "connection", "peer", "coordination", "heartbeat", "barrier",
               "deadline", "unavailable", "socket", "closed", "reset", "timed out")


def _looks_like_peer_failure(e: Exception) -> bool:
  text = f"{type(e).__name__} {e}".lower()
  return "runtimeerror" in text and any(w in text for w in _PEER_WORDS) or any(
      w in text for w in ("gloo", "coordination service", "connection reset"))


def free_port() -> int:
  """A TCP port free on 127.0.0.1 right now (for a coordinator on this machine)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch_local(argv: list[str], num_processes: int, *, devices_per_process: int = 1,
                 env: dict[str, str] | None = None, **popen_kw) -> list[subprocess.Popen]:
  """Starts `argv` (a script taking `define_flags`' flags) as `num_processes`
  processes of one job on this machine, each with `devices_per_process` CPU devices,
  coordinator on 127.0.0.1. With num_processes=1 no flag is added. Returns the
  processes (the caller waits for them)."""
  port = free_port()
  base = {k: v for k, v in (env if env is not None else os.environ).items()
          if k not in ENV}
  base.update(JAX_NUM_CPU_DEVICES=str(devices_per_process))
  base.setdefault("JAX_PLATFORMS", "cpu")
  procs = []
  for i in range(num_processes):
    flags = [] if num_processes == 1 else [
        f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}",
        f"--process_id={i}"]
    procs.append(subprocess.Popen(list(argv) + flags, env=base, **popen_kw))
  return procs
