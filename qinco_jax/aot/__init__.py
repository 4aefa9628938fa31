"""Ahead-of-time compilation for TPU slices and GPU hosts this machine does not have.

`qinco-compile` (`job.py`) compiles the very programs a run executes (the training
step on the pod's data-parallel mesh, the encoder and decoder on one host) for a
target (`targets.py`), with the target's compiler kept out of the user's environment
(`plugins.py`), and reports per chip: memory against the chip's, the largest batch
that fits, matmul FLOPs against the FLOP model, the collectives, and a roofline
prediction of the speed (`hlo.py` reads the compiled program, `report.py` predicts).
"""
