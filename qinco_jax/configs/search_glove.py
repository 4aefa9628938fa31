"""The search job of docs/benchmarks.md's search section: IVF-QINCo2 on GloVe 6B 50-d,
8 bytes after a 1024-list IVF step, on a CPU.

  qinco-search --config=search_glove --workdir=runs/search_glove

Runs the stages ivf, train, encode, build and search into the workdir (any field is
overridden by its flag, e.g. --stage=encode or --time_budget_s=360; --K=16 --M=16 for
the 4-bit index). Measured on a 2-core CPU with the machine idle: ivf about a minute;
train 25 minutes (the budget; 38 epochs, validation MSE 2.04 at A=4, B=4); encode 12.5
minutes (380,000 vectors at A=16, B=32); build and the search sweep a few minutes
each. The last run (docs/benchmarks.md, "Search") trained beside the 4-bit model, so
12.6 epochs to a validation MSE of 2.064: R@1 0.240 at 6,826 queries/s (nprobe 1, AQ
stage only) up to 0.465 with QINCo2 re-ranking; the codes' exhaustive ceiling is R@1
0.4659. Without --config, qinco-search uses the `SearchJob` defaults: 6 epochs and
encoding at the training beam (A=4, B=4).
"""


def get_config() -> dict:
  """`SearchJob` field values (`qinco_jax.search.job.SearchJob` names and documents them)."""
  return dict(data="glove", ivf_K=1024, M=8, L=2, de=64, dh=128, A=4, B=4,
              time_budget_s=1500.0, stop_patience=1000, enc_A=16, enc_B=32)
