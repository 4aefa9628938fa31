"""The files of a search work directory, named in one place (`SearchWorkdir`):

  ivf     -> centroids_ivf.npy, coarse.faiss `coarse.train_ivf`: centroids, list search
  train   -> train/ (IVF-QINCo2)             `trainer.train_and_evaluate`, ivf_centroids
  encode  -> codes_db.{i:04d}of{n:04d}.npy   the database in shards (`shards.encode_shard`),
             (+ .json: the database each came from)
  build   -> index/                          `index.Index`: `decoders.fit_decoders` (AQ
                                             tables, pairwise decoder) + the codes injected
  search  -> sweep.jsonl, sweep.png          `index.load_index(...).searcher()` swept
  every stage -> command.{stage}.txt         the command line that ran it (once it
                                             finished), and its settings in job.json

Everything lives in one directory so each stage can run in its own process (or host)
and the index reloads in a fresh process (`job.run` strings the stages together).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class SearchWorkdir:
  """The files of a search job's work directory (see the module docstring)."""

  root: Path

  def __init__(self, root: str | os.PathLike):
    object.__setattr__(self, "root", Path(root))

  centroids = property(lambda self: self.root / "centroids_ivf.npy")
  coarse = property(lambda self: self.root / "coarse.faiss")  # the list search (ivf)
  model = property(lambda self: self.root / "train")  # the trainer's workdir
  codes = "codes_db"  # shard name prefix (`encode_shard`, `load_shards`)
  index = property(lambda self: self.root / "index")  # `index.Index.save`
  sweep_log = property(lambda self: self.root / "sweep.jsonl")
  sweep_plot = property(lambda self: self.root / "sweep.png")
  tune_log = property(lambda self: self.root / "sweep_tune.jsonl")  # bench_search
  bench = property(lambda self: self.root / "bench_search.json")  # bench_search

  record_file = property(lambda self: self.root / "job.json")  # stages' settings

  def command(self, stage: str) -> Path:
    return self.root / f"command.{stage}.txt"

  def read_record(self) -> dict:
    """{stage: the settings it ran with} of the stages that finished here."""
    try:
      return json.loads(self.record_file.read_text())
    except FileNotFoundError:
      return {}
    except (OSError, ValueError) as e:
      raise ValueError(f"{str(self.record_file)!r} cannot be read ({e}): restore it or "
                       "use a new workdir") from None

  def record(self, stage: str, settings: dict) -> None:
    """Records that `stage` finished with these settings (atomically)."""
    rec = self.read_record()
    rec[stage] = settings
    tmp = self.record_file.with_name(f".{self.record_file.name}.tmp")
    tmp.write_text(json.dumps(rec, indent=1))
    os.replace(tmp, self.record_file)
