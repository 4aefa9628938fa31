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
  * At start-up the processes meet before JAX's own start-up (`initialize`): a process
    that does not come within `startup_timeout_s`, two with one `process_id`, or
    different `num_processes` stop every process with `StartupError` naming them; the
    settings of a training are then compared (`agree_on`) and any difference named.
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
STARTUP_TIMEOUT_S = 120  # how long the processes wait for each other at start-up
BARRIER_TIMEOUT_S = 24 * 3600  # process 0's file writes and evaluation can be long
_heartbeat_s = HEARTBEAT_TIMEOUT_S
_HELLO = "qinco-jax start-up"


class PeerLostError(RuntimeError):
  """Another process of a multi-process run stopped (killed, crashed, unreachable)."""


class DisagreementError(ValueError):
  """The processes of a run were started with different settings (`agree_on`)."""


class StartupError(RuntimeError):
  """The processes of a run could not start together (one missing, two with one
  process id, different numbers of processes, coordinator unreachable)."""


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *,
               heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S,
               startup_timeout_s: float = STARTUP_TIMEOUT_S) -> bool:
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
    startup_timeout_s: seconds the processes wait for each other at start-up.
  Returns:
    True when this is a multi-process run.
  Raises:
    StartupError: a process did not start within `startup_timeout_s` (named), two
      processes have one `process_id`, their `num_processes` differ, or process 0's
      port is taken; every process that started says so and stops.
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
  if not startup_timeout_s > 0:
    raise ValueError(f"startup_timeout_s must be > 0 seconds, got {startup_timeout_s!r}")
  if n is not None and pid is not None:
    rendezvous(address, n, pid, startup_timeout_s)  # JAX's own start-up aborts unnamed
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes
  jax.distributed.initialize(address, n, pid, heartbeat_timeout_seconds=_heartbeat_s,
                             initialization_timeout=max(int(startup_timeout_s), 1))
  return True


def rendezvous(address: str, n: int, pid: int, timeout_s: float):
  """The processes' meeting before JAX starts: process 0 listens on the coordinator's
  port until processes 1..n-1 have said hello, then answers each (and closes the port
  for JAX's coordination service); the others connect, retrying until process 0 is up.
  Raises StartupError on every process that came when one is missing after
  `timeout_s`, two share a process id, or the numbers of processes differ."""
  host, _, port = address.rpartition(":")
  try:
    port_n = int(port)
  except ValueError:
    raise ValueError(f"coordinator address {address!r} must be HOST:PORT") from None
  if pid == 0:
    _gather(port_n, n, timeout_s, address)
  else:
    _meet(host.strip("[]") or "127.0.0.1", port_n, n, pid, timeout_s, address)


def _send(conn: socket.socket, obj: Any):
  conn.sendall((json.dumps(obj) + "\n").encode())


def _recv(conn: socket.socket) -> Any:
  """One JSON line from conn (None when the peer closed first or sent something else)."""
  buf = b""
  while not buf.endswith(b"\n") and len(buf) < 65536:
    chunk = conn.recv(4096)
    if not chunk:
      return None
    buf += chunk
  try:
    return json.loads(buf.decode())
  except (UnicodeDecodeError, ValueError):
    return None


def _gather(port: int, n: int, timeout_s: float, address: str):
  """Process 0's side of `rendezvous`."""
  import time
  try:
    if socket.has_dualstack_ipv6():
      srv = socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)
    else:
      srv = socket.create_server(("", port))
  except OSError as e:
    raise StartupError(
        f"process 0 cannot listen on port {port} of --coordinator_address={address} "
        f"({e.strerror}): is another process of this run also started with "
        "--process_id=0 (each process needs its own id), or another program using the "
        "port? Choose a free port.") from None
  deadline = time.monotonic() + timeout_s
  came: dict[int, socket.socket] = {}
  extra: list[socket.socket] = []
  error = None
  answer: str | None = "process 0 stopped during start-up"  # unless it gets through
  try:
    while error is None and len(came) < n - 1:
      left = deadline - time.monotonic()
      if left <= 0:
        missing = sorted(set(range(1, n)) - set(came))
        error = (f"process{'es' if len(missing) > 1 else ''} "
                 f"{', '.join(map(str, missing))} of {n} did not start within "
                 f"{timeout_s:g} s (--startup_timeout_s): start "
                 f"{'them' if len(missing) > 1 else 'it'} with --process_id="
                 f"{missing[0]}{'...' if len(missing) > 1 else ''}, "
                 f"--num_processes={n} and --coordinator_address={address}")
        break
      srv.settimeout(left)
      try:
        conn, _ = srv.accept()
      except TimeoutError:
        continue
      conn.settimeout(10)
      try:
        hello = _recv(conn)
      except OSError:
        hello = None
      if not isinstance(hello, dict) or hello.get("hello") != _HELLO:
        conn.close()  # not one of ours
        continue
      who, their_n = hello.get("process_id"), hello.get("num_processes")
      if their_n != n:
        error = (f"process {who} was started with --num_processes={their_n}, process 0 "
                 f"with --num_processes={n}: start every process with the same number")
      elif who in came or who == 0:
        error = (f"two processes were started with --process_id={who}: each process "
                 f"needs its own id, 0..{n - 1}")
      if who in came or who == 0 or not isinstance(who, int):
        extra.append(conn)
      else:
        came[who] = conn
    answer = error
  finally:
    srv.close()
    for conn in list(came.values()) + extra:
      try:
        _send(conn, {"error": answer})
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)  # the peer closes first (its side keeps the TIME_WAIT)
      except OSError:
        pass
      conn.close()
  if error is not None:
    raise StartupError(error)


def _meet(host: str, port: int, n: int, pid: int, timeout_s: float, address: str):
  """A process's (but 0's) side of `rendezvous`."""
  import time
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      conn = socket.create_connection((host, port), timeout=5)
      break
    except OSError:
      if time.monotonic() > deadline:
        raise StartupError(
            f"process {pid} of {n} could not reach process 0 (the coordinator) at "
            f"{address} within {timeout_s:g} s (--startup_timeout_s): start it with "
            "--process_id=0 on that host, or correct --coordinator_address") from None
      time.sleep(0.2)
  try:
    with conn:
      conn.settimeout(2 * timeout_s + 30)  # process 0 answers by its own deadline
      _send(conn, {"hello": _HELLO, "process_id": pid, "num_processes": n})
      answer = _recv(conn)
  except OSError as e:
    raise StartupError(f"process {pid} lost process 0 (the coordinator) at {address} "
                       f"during start-up ({e})") from None
  if not isinstance(answer, dict):
    raise StartupError(
        f"process {pid}: no start-up answer from process 0 at {address} (it stopped, or "
        f"the run had already started: is another process also --process_id={pid}?)")
  if answer.get("error"):
    raise StartupError(answer["error"])


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
  flags.DEFINE_float("startup_timeout_s", STARTUP_TIMEOUT_S,
                     "multi-process runs: seconds the processes wait for each other at "
                     "start-up (a process missing then is named)")


def initialize_from_flags() -> bool:
  """`initialize` with the values of the flags `define_flags` added."""
  from absl import flags
  F = flags.FLAGS
  return initialize(F.coordinator_address, F.num_processes, F.process_id,
                    startup_timeout_s=F.startup_timeout_s)


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


_n_agreements = 0  # agree_on calls so far (the same on every process)


def agree_on(what: str, value: Any, timeout_s: float = BARRIER_TIMEOUT_S):
  """Checks that every process passes the same JSON-able `value` (settings that must
  match for the processes to run one job), through the coordination service's
  key-value store. Raises DisagreementError (a ValueError) on every process, naming
  each difference from process 0's value (`what`: how the message calls it). A no-op
  for one process."""
  if not multi():
    return
  from jax._src import distributed as _dist
  client = _dist.global_state.client
  assert client is not None  # multi(): jax.distributed is initialized
  global _n_agreements
  _n_agreements += 1
  key = f"qinco_jax/agree/{_n_agreements}"
  with peer_guard(f"comparing {what}"):
    client.key_value_set(f"{key}/{jax.process_index()}", json.dumps(value, sort_keys=True))
    values = [json.loads(client.blocking_key_value_get(f"{key}/{i}", int(timeout_s * 1000)))
              for i in range(jax.process_count())]
  diffs = [f"{path or 'value'}: process 0 has {a!r}, process {i} has {b!r}"
           for i, v in enumerate(values[1:], 1) for path, a, b in _differences(values[0], v)]
  if diffs:
    raise DisagreementError(f"the processes disagree on {what}: " + "; ".join(diffs[:6])
                     + ("; ..." if len(diffs) > 6 else "")
                     + ". Start every process with the same flags and data.")


def _differences(a: Any, b: Any, path: str = "") -> Iterator[tuple[str, Any, Any]]:
  """(dotted path, a's value, b's value) for each leaf where JSON values a, b differ."""
  if isinstance(a, dict) and isinstance(b, dict):
    for k in sorted(set(a) | set(b)):
      yield from _differences(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
  elif a != b:
    yield path, a, b


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
  they wait for it). A lost peer or a difference of settings prints one line. A single
  process re-raises."""
  try:
    yield
  except BaseException as e:
    if not multi() or isinstance(e, SystemExit) and not e.code:
      raise
    sys.stdout.flush()
    if isinstance(e, DisagreementError):  # every process stops: together (the
      print(f"error: {e}", file=sys.stderr, flush=True)  # others abort if process 0
      with contextlib.suppress(Exception):  # and its coordination service go first)
        jax.distributed.shutdown()
    elif isinstance(e, PeerLostError):
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
