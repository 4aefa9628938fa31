"""Search across machines: index parts served by several processes, queries fanned
out and the candidates merged, with faiss's own RPC (`faiss.contrib.rpc`).

A database too large for one machine is built as several index parts (each an
`Index` saved with a slice of the rows, by id range: `add_shards` of some of the
encode stage's shards), all with the same codec, decoders and coarse quantiser.
Each part is served by `serve` (a `faiss.contrib.rpc.Server` per connection, as
faiss's `client_server.SearchServer`), which only scans its inverted lists. The
client (`connect`) holds what is small (the codec, the decoders, the centroids and
the list search): per batch of queries it chooses the lists once, asks every part
for its n best candidates of those lists (in parallel, one thread per part, as
faiss's `ClientIndex`), keeps the n best of all, then runs the pairwise shortlist and
the QINCo2 re-rank itself. The n best of a union are the n best of the parts' n best,
so the answer is the one a single process holding every row gives (tested with two
processes on 127.0.0.1).

A part that does not answer stops the search with `PartLostError` naming it, or,
with `allow_partial=True`, the others' answer comes back with a
`PartialResultsWarning` naming the missing parts (also in `missing_parts`): never a
silently shorter list. Arguments and results cross the wire as bytes (NumPy's own
format), so faiss's restricted unpickler needs no class: run the parts on a trusted
network only (faiss's RPC has no authentication), by default on 127.0.0.1.

    python -m qinco_jax.search.serve PART_DIR --host=0.0.0.0 --port=12345   # per part
    index = serve.connect(PART_DIR, [("host1", 12345), ("host2", 12345)])
    D, I = index.search(xq, 10, nprobe=64)
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import socket
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from qinco_jax.search.fastscan import Lists
from qinco_jax.search.index import Index, load_index


class PartLostError(RuntimeError):
  """An index part did not answer."""


class PartialResultsWarning(UserWarning):
  """Results computed without some index parts (allow_partial=True)."""


def _pack(**arrays: np.ndarray) -> bytes:
  buf = io.BytesIO()
  savez: Any = np.savez
  savez(buf, **arrays)
  return buf.getvalue()


def _unpack(b: bytes) -> dict[str, np.ndarray]:
  with np.load(io.BytesIO(b), allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


def fingerprint(ivf: Lists) -> str:
  """What parts must share: centroids, tables, levels, metric (blake2b)."""
  h = hashlib.blake2b(ivf.metric.encode(), digest_size=16)
  for a in (ivf.centroids, ivf.tables, ivf.levels):
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def _rpc():
  from faiss.contrib import rpc
  return rpc


def _client(host: str, port: int, timeout_s: float | None):
  """faiss's RPC client (its protocol: `generic_fun`, `get_result`) on a socket we
  open, so that a failed connection closes it and answers have a time limit."""
  rpc = _rpc()
  client = rpc.Client.__new__(rpc.Client)
  client.sock = socket.create_connection((host, port), timeout=timeout_s)
  client.fs = rpc.FileSock(client.sock)
  return client


def _server_class():
  rpc = _rpc()

  class PartServer(rpc.Server):
    """The RPC methods of one part (faiss's `Server` calls them by name)."""

    def __init__(self, conn, ivf: Lists):
      rpc.Server.__init__(self, conn, logf=open(os.devnull, "w"))  # noqa: SIM115
      self.ivf = ivf

    def info(self) -> str:
      return json.dumps({"ntotal": self.ivf.ntotal, "fingerprint": fingerprint(self.ivf)})

    def scan(self, arrays: bytes, n: int) -> bytes:
      a = _unpack(arrays)
      D, lists, codes, ids = self.ivf.scan(a["q"], a["Dc"], a["Ic"], int(n))
      return _pack(D=D, lists=lists, codes=codes, ids=ids)

  return PartServer


def serve(path: str | os.PathLike, host: str = "127.0.0.1", port: int = 0,
          ready_file: str | os.PathLike | None = None, stop: threading.Event | None = None):
  """Serves the inverted lists of the index saved at `path` (memory-mapped) until
  `stop` is set (or forever). port 0 picks a free one; `ready_file` receives
  "host:port" (written atomically) once connections are accepted."""
  ivf = load_index(path)._ivf
  assert ivf is not None  # a saved index is trained
  server_class = _server_class()
  sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  sock.bind((host, port))
  sock.listen(16)
  sock.settimeout(0.5)
  if ready_file is not None:
    tmp = Path(f"{ready_file}.tmp")
    tmp.write_text(f"{host}:{sock.getsockname()[1]}")
    os.replace(tmp, ready_file)
  try:
    while stop is None or not stop.is_set():
      try:
        conn, _ = sock.accept()
      except TimeoutError:
        continue
      conn.settimeout(None)
      threading.Thread(target=server_class(conn, ivf).exec_loop, daemon=True).start()
  finally:
    sock.close()


class RemoteLists:
  """The inverted lists of several served parts, searched as one (`IVFIndex`'s
  search interface: `assign` here, `scan` on every part, candidates merged).

  Args:
    local: the lists (`IVFIndex` or `FastScanLists`) with the parts' centroids,
      tables and list search (one part's, opened memory-mapped: its rows are not read;
      4-bit lists are read into memory).
    addresses: (host, port) of each part.
    allow_partial: answer without the parts that fail (with a warning) instead of
      raising `PartLostError`.
    timeout_s: how long a part may take to answer (None: no limit); a part that
      stopped answering without closing its connection (a lost machine) then fails
      like one that did.
  """

  def __init__(self, local: Lists, addresses, allow_partial: bool = False,
               timeout_s: float | None = 600.0):
    self.local, self.addresses = local, [(str(h), int(p)) for h, p in addresses]
    self.allow_partial = allow_partial
    self.missing_parts: list[str] = []
    self.clients = []
    self._ntotal = 0
    want = fingerprint(local)
    self._pool = ThreadPoolExecutor(max(1, len(self.addresses)))
    for i, (h, p) in enumerate(self.addresses):
      try:
        client = _client(h, p, timeout_s)
      except OSError as e:
        self.close()
        raise PartLostError(f"index part {i} at {h}:{p} cannot be reached ({e})") from None
      self.clients.append(client)
      try:
        info = json.loads(client.info())
      except (OSError, EOFError) as e:
        self.close()
        raise PartLostError(f"index part {i} at {h}:{p} does not answer ({e})") from None
      if info["fingerprint"] != want:
        self.close()
        raise ValueError(f"index part {i} at {h}:{p} holds lists of another index (other "
                         "centroids, tables or metric) than the one connected to")
      self._ntotal += int(info["ntotal"])

  metric = property(lambda self: self.local.metric)
  M = property(lambda self: self.local.M)
  nlist = property(lambda self: self.local.nlist)
  centroids = property(lambda self: self.local.centroids)
  coarse = property(lambda self: self.local.coarse)
  exact_coarse = property(lambda self: self.local.exact_coarse)
  ntotal = property(lambda self: self._ntotal)

  def assign(self, q, nprobe: int, ef_search: int):
    return self.local.assign(q, nprobe, ef_search)

  def close(self) -> None:
    """Closes the connections to the parts (also done when collected)."""
    for c in self.clients:
      c.sock.close()
    self.clients = []
    self._pool.shutdown(wait=False)

  def __del__(self):
    if getattr(self, "clients", None):
      self.close()

  def scan(self, q, Dc, Ic, n: int):
    """`IVFIndex.scan` over every part: each part's n best, then the n best of all."""
    payload = _pack(q=np.ascontiguousarray(q, np.float32), Dc=Dc, Ic=Ic)

    def ask(i):
      try:
        return _unpack(self.clients[i].scan(payload, int(n)))
      except Exception as e:  # socket errors, EOF, the server's own exception
        return e

    answers = list(self._pool.map(ask, range(len(self.clients))))
    lost = [(i, a) for i, a in enumerate(answers) if isinstance(a, Exception)]
    self.missing_parts = [f"{i} ({self.addresses[i][0]}:{self.addresses[i][1]})"
                          for i, _ in lost]
    if lost:
      i, err = lost[0]
      names = ", ".join(self.missing_parts)
      if not self.allow_partial:
        raise PartLostError(f"index part(s) {names} did not answer ({err!r}): their rows "
                            "are missing from the results; restart them, or connect with "
                            "allow_partial=True to search the others")
      warnings.warn(f"results without index part(s) {names}: they did not answer "
                    f"({err!r})", PartialResultsWarning, stacklevel=2)
    got = [a for a in answers if not isinstance(a, Exception)]
    if not got:
      raise PartLostError("no index part answered")
    D = np.concatenate([g["D"] for g in got], 1)
    key = -D if self.metric == "ip" else D
    order = np.argsort(key, axis=1, kind="stable")[:, :n]
    take = lambda k: np.take_along_axis(np.concatenate([g[k] for g in got], 1),
                                        order if got[0][k].ndim == 2 else order[..., None], 1)
    return (np.take_along_axis(D, order, 1), take("lists"), take("codes"), take("ids"))

  def search(self, q, n: int, nprobe: int, ef_search: int):
    q = np.ascontiguousarray(q, np.float32)
    Dc, Ic = self.assign(q, nprobe, ef_search)
    return self.scan(q, Dc, Ic, n)


def connect(path: str | os.PathLike, addresses, allow_partial: bool = False,
            timeout_s: float | None = 600.0) -> Index:
  """An `Index` searching the parts served at `addresses` (`serve`), with the codec,
  decoders and list search of the index part saved at `path` (any part: they share
  them; its rows are not read). Read-only: `search` and `searcher` only
  (`RemoteLists`: allow_partial, timeout_s)."""
  index = load_index(path)
  assert index._ivf is not None  # a saved index is trained
  index._ivf = RemoteLists(index._ivf, addresses, allow_partial,  # type: ignore[assignment]
                           timeout_s)
  return index


def main(argv: list[str] | None = None):
  """`python -m qinco_jax.search.serve PART_DIR [--host H] [--port P] [--ready_file F]`"""
  p = argparse.ArgumentParser(prog="python -m qinco_jax.search.serve",
                              description="Serve the inverted lists of one index part.")
  p.add_argument("path", help="a saved index (one part)")
  p.add_argument("--host", default="127.0.0.1", help="address to listen on")
  p.add_argument("--port", type=int, default=0, help="port (0: a free one)")
  p.add_argument("--ready_file", default=None, help="receives host:port when serving")
  args = p.parse_args(argv)
  try:
    serve(args.path, args.host, args.port, args.ready_file)
  except (OSError, ValueError) as e:
    sys.exit(f"serve: {e}")


if __name__ == "__main__":
  main()
