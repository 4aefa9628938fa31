"""`python -m qinco_jax.aot`: the same as `qinco-compile`."""

import sys

from qinco_jax.aot.job import main

if __name__ == "__main__":
  sys.exit(main())
