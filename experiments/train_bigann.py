"""Train (and evaluate) a QINCo2 model: `qinco-train` (qinco_jax/cli.py) from a clone.

  python experiments/train_bigann.py --config=glove_small --workdir=runs/glove
  python experiments/train_bigann.py --config=qinco2_s --config.data.root=/data/bigann \
      --config.model.M=16 --workdir=runs/s16

Without flags it trains the small GloVe model (qinco_jax/configs/glove_small.py).
--config takes a config name or any config file; overrides: --config.model.A=4
--config.ds.loop=1000000 --config.resume=True --config.train.time_budget_s=3600 ...;
--print_config shows what they resolve to, --help lists the fields.

Several processes (README, "Training on several hosts"): run the same command on each
with --coordinator_address=HOST:PORT --num_processes=N --process_id=i (or the
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID variables); TPU pods and
SLURM need none of them.
"""

from qinco_jax import cli

if __name__ == "__main__":
  cli.train()
