"""Train (and evaluate) a QINCo2 model.

  python experiments/train_bigann.py --config=experiments/configs/glove_small.py \
      --workdir=runs/glove
  python experiments/train_bigann.py --config=experiments/configs/qinco2_s.py \
      --config.data.root=/data/bigann --config.model.M=16 --workdir=runs/s16

Without flags it trains the small GloVe model (experiments/configs/glove_small.py).
Overrides: --config.model.A=4 --config.ds.loop=1000000 --config.resume=True
--config.train.time_budget_s=3600 ...; --print_config shows what they resolve to.

Several processes (README, "Training on several hosts"): run the same command on each
with --coordinator_address=HOST:PORT --num_processes=N --process_id=i (or the
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID variables); TPU pods and
SLURM need none of them.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # for configs.common

from absl import app, flags, logging  # noqa: E402

from qinco_jax import distributed, experiment  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
experiment.define_config_flag(os.path.join(_HERE, "configs", "glove_small.py"))
flags.DEFINE_string("workdir", "runs/glove", "checkpoints, metrics and eval output")
flags.DEFINE_bool("print_config", False,
                  "print the model and training configs the flags resolve to, and exit")
distributed.define_flags()


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # keep Orbax's per-save info lines out
  c = flags.FLAGS.config
  if flags.FLAGS.print_config:
    print(experiment.describe(c))
    return
  distributed.initialize_from_flags()
  with distributed.exit_on_error():
    experiment.run(c, flags.FLAGS.workdir)


if __name__ == "__main__":
  app.run(main, flags_parser=experiment.parse_flags)
