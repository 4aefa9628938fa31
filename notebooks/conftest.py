"""Notebook runs under pytest (nbmake): tiny sizes, CPU only.

The kernels nbmake starts inherit this process's environment.
"""
import os

os.environ.setdefault("QINCO_QUICK", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_NUMPY_RANK_PROMOTION", "raise")  # as the tests (tests/conftest.py)
