"""Evaluate a trained codec (`qinco-eval`): MSE, per-step MSE, R@1/10/100, codebook
usage, as JSON.

  python experiments/eval.py --model=runs/glove --A=16 --B=32
  python experiments/eval.py --model=runs/glove --A=8 --B=128 --n_db=10000   # quicker
"""

from qinco_jax import cli

if __name__ == "__main__":
  cli.evaluate()
