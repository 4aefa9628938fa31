"""How long a training run is: `Planner`, for a number of epochs or a wall-time budget.

Without a budget a run is `TrainConfig.epochs` epochs (fewer when early stopping ends
it) and the optimiser's own schedule sets the learning rate. With
`TrainConfig.time_budget_s` the quarter cosine is planned in updates so that it ends
with the budget (`train.budget_lr`):

- the plan starts as `epochs` epochs of updates (the seed plan);
- inside the first epoch of a call it is guarded (`after_update`): one epoch can
  outlast the whole budget (10M samples at a large beam on a CPU);
- after every epoch it is re-planned from the measured time per update, validation
  included (`end_epoch`); once the plan is reached the run is over.

What the plan cannot cut (the RQ initialisation and the initial validation before the
first update, each epoch's validation) can make a run outlast its budget: `start`
says so when the budget is spent before the first update (the run then makes the
few updates of the first guard), `finish` when the run ended more than OVERRUN past
it; the trainer warns and logs both.

The plan and the time spent live in the checkpoint's meta (`plan_steps`,
`elapsed_s`), so a resumed run continues the same plan and counts earlier sessions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from qinco_jax import distributed as dist
from qinco_jax import train

# 0-based updates of the first epoch at which the budget is checked (then log points).
EARLY_GUARDS = (2, 4, 8, 16, 32)
# A run that ends more than this fraction of its budget past it is reported (`finish`);
# the re-plan itself may overrun by up to one epoch's validation.
OVERRUN = 0.1


class Planner:
  """Decides when a run stops and, under a budget, the lr of every update.

  Args:
    cfg: the training recipe (`epochs`, `time_budget_s`, `log_every`).
    steps_per_epoch: updates per epoch.
    meta: the run's checkpointed state (read and updated in place: `plan_steps`,
      `elapsed_s`).
    t_call: clock time at which this call started (earlier sessions' `elapsed_s` are
      added to the budget spent).
    clock: seconds (injectable: tests run on scripted time).
  """

  def __init__(self, cfg: train.TrainConfig, steps_per_epoch: int, meta: dict[str, Any],
               t_call: float, clock: Callable[[], float]):
    self.cfg, self.steps, self.meta, self.clock = cfg, steps_per_epoch, meta, clock
    self.budget = cfg.time_budget_s
    self.t_start = t_call - meta.get("elapsed_s", 0.0)
    meta.setdefault("plan_steps", int(cfg.epochs * steps_per_epoch))
    self.reserve = 0.0  # seconds kept back for the validation that ends an epoch
    self._first_epoch: int | None = None
    # (time, update) from which the per-update time is measured
    self._loop: tuple[float, int] | None = None
    # first-epoch guard: (time, update, fastest s per update)
    self._mark: tuple[float, int, float] | None = None
    self._seed: int | None = None  # the plan this call started from (set by `start`)
    self._setup_s = 0.0  # seconds of this call before its first update (set by `start`)
    self._ended = False  # an epoch of this call ended (`end_epoch`)

  @property
  def epochs(self) -> int:
    """Epochs the loop may run: `epochs`, or unbounded under a budget."""
    return self.cfg.epochs if self.budget is None else 1 << 30

  def start(self, epoch: int, gstep: int, t_call: float | None = None) -> str | None:
    """Call once, right before the first epoch of this call (`t_call`: when the call
    began, for the report). Returns a warning when the budget is already spent and
    updates are still planned, else None."""
    now = self.clock()
    self._first_epoch, self._loop = epoch, (now, gstep)
    self._mark, self._seed = None, self.meta["plan_steps"]
    self._setup_s = now - (self.t_start if t_call is None else t_call)
    spent = now - self.t_start
    if self.budget is None or spent < self.budget or self.done(gstep):
      return None
    earlier = self.meta.get("elapsed_s", 0.0)
    return (f"the time budget ({self.budget:g} s) was spent before the first update: "
            f"{self._setup_s:.0f} s went to the start of training (RQ initialisation and "
            "initial validation, or reading the checkpoint)"
            + (f" and {earlier:.0f} s to earlier sessions" if earlier else "")
            + f", so at most {EARLY_GUARDS[0] + 1} updates run; raise time_budget_s (or "
            "train for a number of epochs)")

  def finish(self) -> str | None:
    """After the last epoch: a warning when the run took more than OVERRUN past its
    budget (what took the time), else None."""
    spent = self.meta.get("elapsed_s")
    if (self.budget is None or not self._ended or spent is None
        or spent <= self.budget * (1 + OVERRUN)):
      return None
    return (f"training took {spent:.0f} s, {spent - self.budget:.0f} s past its time "
            f"budget ({self.budget:g} s): the {self._setup_s:.0f} s before the first "
            "update (RQ initialisation, initial validation) and each epoch's validation "
            "are not cut by the budget")

  def done(self, gstep: int) -> bool:
    """Whether the plan is complete after `gstep` updates (never without a budget)."""
    return self.budget is not None and gstep >= self.meta["plan_steps"]

  def lr(self, gstep: int) -> float | None:
    """The lr of update `gstep` (0-based) under a budget; None: the optimiser's own."""
    if self.budget is None:
      return None
    return train.budget_lr(gstep, self.steps, self.meta["plan_steps"], self.cfg)

  def after_update(self, epoch: int, j: int, gstep: int, metrics):
    """First-epoch guard, after update j of the epoch (`gstep` updates done).

    After the first, compiling update this marks the time; at guard points (updates
    3, 5, 9, 17, 33 of the epoch, then every log point) it predicts the updates left
    from the fastest time per update seen between guard points (keeping `reserve`
    for the validation that ends the epoch). The plan becomes the smaller of that and
    the plan the call started with; until update 33 it does not end before the next
    guard point unless the budget is already spent, so one slow, noisy window of a
    few updates cannot stop the run: the next estimate, from more updates, can
    lengthen it again (the end-of-epoch re-plan may lengthen it further). Every
    process takes process 0's value.
    """
    if self.budget is None or epoch != self._first_epoch:
      return
    guard = j in EARLY_GUARDS or (j > EARLY_GUARDS[-1] and (j + 1) % self.cfg.log_every == 0)
    if j != 0 and not guard:
      return
    jax.block_until_ready(metrics)
    now = self.clock()
    if self._mark is None:
      self._mark = (now, gstep, float("inf"))
      return
    t0, g0, fastest = self._mark
    per_step = min(fastest, (now - t0) / max(gstep - g0, 1))
    left = int((self.budget - self.reserve - (now - self.t_start)) / per_step)
    if 0 < left and j < EARLY_GUARDS[-1]:  # early, noisy estimate: go on to the next
      left = max(left, next(i for i in EARLY_GUARDS if i > j) - j)
    assert self._seed is not None  # set by `start` (this is its first epoch)
    self.meta["plan_steps"] = min(self._seed, dist.agree(gstep + max(left, 0)))
    self._mark = (now, gstep, per_step)

  def end_epoch(self, epoch: int, gstep: int):
    """After an epoch's validation: records the time spent and re-plans from the
    time per update so far (validation included). Once the plan is reached the run is
    over: no re-plan, or a last sliver epoch would follow."""
    now = self.clock()
    self.meta["elapsed_s"] = now - self.t_start
    self._ended = True
    if self.budget is None or gstep >= self.meta["plan_steps"]:
      return
    assert self._loop is not None  # set by `start`
    t0, g0 = self._loop
    per_step = (now - t0) / max(gstep - g0, 1)
    left = int((self.budget - self.meta["elapsed_s"]) / per_step)
    self.meta["plan_steps"] = dist.agree(gstep + max(left, 0))
    if epoch == self._first_epoch:  # later plans leave out the compile-heavy first epoch
      self._loop = (now, gstep)
