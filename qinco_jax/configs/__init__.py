"""Experiment configs: one file per experiment, each with its command, run time and
result in its docstring. `qinco-train --config=NAME` takes a training config
(ml_collections) by name (glove_small, synthetic_tiny, qinco2_s, qinco2_m, qinco2_l,
qinco1) or any such file by path; `common.base()` is the skeleton every training config
starts from. `qinco-search --config=NAME` takes a search config (search_glove): a
`get_config()` returning `search.job.SearchJob` field values."""
