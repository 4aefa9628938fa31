"""Quality per CPU-minute: QINCo2 trained for a wall-time budget, next to faiss RQ
(`qinco_jax.bench.budget`). Finished runs are kept in WORKDIR/runs.jsonl and skipped
when a command is run again; the table of every kept row goes to docs/benchmarks.md,
the curve to docs/budget.png.

  python experiments/bench_budget.py --minutes=1,3,10,30,60 --inits=rq,reference
  python experiments/bench_budget.py --minutes=3 --lr=8e-4,4e-3,1.6e-2 --tag=lr  # ablation
  python experiments/bench_budget.py --minutes=60 --lr=4e-3 --n_db=0 --eval_A=8 \
      --eval_B=128 --reeval      # the kept codecs at another beam and database
  python experiments/bench_budget.py --help                                      # every flag
"""

from qinco_jax.bench import budget, harness

if __name__ == "__main__":
  harness.script_main(budget.BudgetBench, budget.run, __file__, __doc__)
