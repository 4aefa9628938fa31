"""The benchmarks behind `experiments/bench_*.py`: one module per benchmark, each a
frozen config dataclass (whose fields are the script's flags) and one `run(cfg,
command)` that measures, prints and writes its own section of docs/benchmarks.md.
`harness` holds what they share (flags from a config, timing, the FLOP model). The
library never imports this package; these modules import the library."""
