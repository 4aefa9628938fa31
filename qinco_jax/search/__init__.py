"""Search: IVF-QINCo2 nearest-neighbour search, from a database's codes to answers.

One module per stage, each importing only the ones above it in this table (and the
codec-side modules below the package):

  workdir.py   the files of a search work directory (`SearchWorkdir`)
  coarse.py    ivf: the coarse quantiser's centroids
  listfile.py  the on-disk inverted lists (faiss's layout): write, merge, map
  lists.py     the inverted lists of codes, scanned with one look-up table per query
  fastscan.py  the lists of 4-bit codes (K = 16), scanned by faiss's IVF additive fast-scan
  query.py     search: IVF/AQ -> pairwise shortlist -> QINCo2 re-rank (`Searcher`)
  decoders.py  build: the AQ tables and pairwise decoder fitted on encoded vectors
  shards.py    encode: the database's codes in shard files
  build.py     build: shards streamed into on-disk lists, memory bounded by a shard
  legacy.py    indexes saved by earlier versions, read into the current lists
  index.py     `Index` / `load_index`: the faiss-style face of build and search
  serve.py     index parts served by several processes (faiss's RPC), searched as one
  sweep.py     the Pareto-pruned sweep of the search settings
  job.py       the search job (`SearchJob`, `run`): the body of `qinco-search`

Inputs are checked once, where they enter (`Index`'s methods, `SearchJob`, the
functions of `shards`); the stages below trust what they are handed.
"""

from qinco_jax.search.index import Index, load_index
from qinco_jax.search.query import FewerResultsWarning, Searcher, SearchParams

__all__ = ["Index", "load_index", "Searcher", "SearchParams", "FewerResultsWarning"]
