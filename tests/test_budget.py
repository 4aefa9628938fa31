"""`budget.Planner` on scripted time: the seed plan, the first-epoch guard and the
end-of-epoch re-plan, hand-computed."""

import pytest

from qinco_jax import budget, train


class Clock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def test_without_a_budget_epochs_end_the_run():
  cfg = train.TrainConfig(epochs=7)
  meta, clock = {}, Clock()
  p = budget.Planner(cfg, 10, meta, 0.0, clock)
  p.start(0, 0)
  assert p.epochs == 7 and not p.done(10**9) and p.lr(5) is None
  clock.now = 12.5
  p.end_epoch(0, 10)
  assert meta == {"plan_steps": 70, "elapsed_s": 12.5}  # no re-plan


def test_end_of_epoch_replans_from_the_time_per_update():
  cfg = train.TrainConfig(epochs=1000, warmup_epochs=1, time_budget_s=100.0)
  meta, clock = {}, Clock()
  p = budget.Planner(cfg, 10, meta, 0.0, clock)
  assert meta["plan_steps"] == 10_000 and p.epochs > 10**6
  clock.now = 1.0
  p.start(0, 0)
  # First epoch: 10 updates in 9 s (compilation included) -> 0.9 s per update;
  # 100 - 10 = 90 s left -> 100 more updates.
  clock.now = 10.0
  p.end_epoch(0, 10)
  assert meta["elapsed_s"] == 10.0 and meta["plan_steps"] == 10 + 100
  # Later plans are timed from the end of the first epoch: 10 updates in 5 s.
  clock.now = 15.0
  p.end_epoch(1, 20)
  assert meta["plan_steps"] == 20 + int((100 - 15) / 0.5)
  assert not p.done(189) and p.done(190)
  # The lr is the budget schedule ending at the plan.
  assert p.lr(50) == train.budget_lr(50, 10, 190, cfg)
  # Once the plan is reached there is no re-plan (no sliver epoch).
  clock.now = 99.0
  p.end_epoch(2, 190)
  assert meta["plan_steps"] == 190


def test_first_epoch_guard_cuts_a_plan_longer_than_the_budget():
  """An epoch of 1,000 updates of 0.1 s against a 20 s budget with a 2 s validation
  kept in reserve: the guard cuts the plan to about 180 updates inside the epoch."""
  cfg = train.TrainConfig(epochs=3, warmup_epochs=1, time_budget_s=20.0, log_every=50)
  meta, clock = {}, Clock()
  p = budget.Planner(cfg, 1000, meta, 0.0, clock)
  p.reserve = 2.0
  p.start(0, 0)
  for j in range(1000):
    clock.now += 0.1
    gstep = j + 1
    p.after_update(0, j, gstep, None)
    if p.done(gstep):
      break
  assert 170 <= gstep <= 181, gstep
  assert meta["plan_steps"] == gstep


def test_a_noisy_early_window_cannot_stop_the_run():
  """At update 3 a slow window (2.5 s per update) predicts 1 update left of a 10 s
  budget: the plan still reaches the next guard point (update 5), where more updates
  give a better estimate; a budget already spent stops at once."""
  cfg = train.TrainConfig(epochs=3, warmup_epochs=1, time_budget_s=10.0)
  meta, clock = {}, Clock()
  p = budget.Planner(cfg, 1000, meta, 0.0, clock)
  p.start(0, 0)
  clock.now = 1.0
  p.after_update(0, 0, 1, None)  # the mark
  clock.now = 6.0
  p.after_update(0, 2, 3, None)
  assert meta["plan_steps"] == 5
  clock.now = 6.25  # fast updates now: 0.125 s each -> 3.75 s / 0.125 = 30 left
  p.after_update(0, 4, 5, None)
  assert meta["plan_steps"] == 5 + 30
  clock.now = 10.5
  p.after_update(0, 8, 9, None)
  assert meta["plan_steps"] == 9 and p.done(9)
  # A resumed call continues the plan and counts the time already spent.
  meta2 = dict(meta, elapsed_s=4.0)
  p2 = budget.Planner(cfg, 1000, meta2, 100.0, clock)
  assert p2.t_start == 96.0 and meta2["plan_steps"] == 9


def test_budget_lr_anneals_to_the_floor():
  cfg = train.TrainConfig(lr=1.0, warmup_epochs=1, time_budget_s=5.0)
  lrs = [train.budget_lr(s, 10, 40, cfg) for s in range(40)]
  assert lrs[9] == pytest.approx(1.0) and lrs[-1] == pytest.approx(cfg.lr_min_fact)
