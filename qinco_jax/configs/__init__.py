"""Experiment configs (ml_collections): one file per experiment, each with its command,
run time and result in its docstring. `qinco-train --config=NAME` takes one by name
(glove_small, synthetic_tiny, qinco2_s, qinco2_m, qinco2_l, qinco1) or any config file
by path; `common.base()` is the skeleton every config starts from."""
