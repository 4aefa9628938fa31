"""Large-scale search with IVF-QINCo2 (`qinco-search`, qinco_jax/cli.py and search/job.py):
stages ivf, train, encode, build, search (or all).

  # GloVe default (database = 90k db + 290k train vectors, 10k queries), all stages:
  python experiments/search_bigann.py --workdir=runs/search_glove
  # BigANN1B layout, one stage at a time, database encoded by 4 processes:
  python experiments/search_bigann.py --data=bigann --root=/data/bigann --stage=ivf ...
  python experiments/search_bigann.py ... --stage=encode --shard=0/4   # and 1/4, 2/4, 3/4

Every stage reads what the previous ones wrote under --workdir. Run as several
processes of one JAX job (--coordinator_address, --num_processes, --process_id, as
train_bigann.py), train trains data-parallel over all of them and encode splits the
database by process (process i writes shard i/N, the same files as N `--shard i/N`
jobs); ivf, build and search run on process 0 while the others wait. The workdir
must then be on a filesystem that every process sees.
"""

from qinco_jax import cli

if __name__ == "__main__":
  cli.search()
