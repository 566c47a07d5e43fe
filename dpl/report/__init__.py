"""``python -m dpl.report``: compare the runs of one MLflow experiment or one sweep.

Reads the local MLflow store (``sqlite:///mlflow.db`` in the current directory unless
``--tracking-uri`` says otherwise; nothing goes over the network) and writes, into
``--out`` (default ``reports/<experiment or sweep>``, the name made one safe folder name):

* ``summary.csv`` and the table of ``report.md``: final metrics grouped by method / K / H /
  dynamic_h / optimizer / batch size / compression / ablation, plus any other parameter that
  varies inside those groups (the slow momentum of a SlowMo grid, the lr of an Optuna search):
  per group n, mean, sample std and the 95 % confidence interval of the mean (Student's t,
  n − 1 df; :mod:`dpl.report.stats`) over the runs of a group, which differ only in their seed.
  A sweep's report is its FINISHED runs (``--include-failed``: its others too); failed (diverged)
  runs are counted per group and listed with their reason; they never enter a mean.
  ``runs.csv``: the same metrics per run.
* ``comparisons.csv`` and the second table: every group against its baseline (``--baseline``; by
  default the one the sweep's own axes make natural, :func:`dpl.report.tables.natural_baseline`):
  the difference of the means with its 95 % interval, the p-value of a paired (shared
  seeds) or Welch t-test and the p-value adjusted by Holm's method.
* ``budget.csv`` and the third table: the first epoch each run reached a target validation
  accuracy (``--target-acc``; by default the lowest of the groups' best mean validation
  accuracies, :func:`dpl.report.tables.natural_target`), and the samples, syncs, bytes and modelled time spent by then
  (:mod:`dpl.report.budget`), per group with intervals; ``budget_to_target.png`` draws it.
* ``time_vs_bandwidth.csv`` and ``time_vs_bandwidth.png``: the modelled time each group took to that
  target had the network had another bandwidth (``--bandwidths``, default 1, 10, 100 Gbit/s), from
  each epoch's compute, latency and transfer (:func:`dpl.comm.cost.epoch_time_at`): where DiLoCo,
  streaming DiLoCo and data-parallel training of one config cross over.
* ``acc_vs_H.png`` (accuracy against H, a line per K), ``acc_vs_rounds.png`` (accuracy
  against communication rounds), ``learning_curves.png`` (validation accuracy per epoch,
  one curve per group), ``h_over_epochs.png`` (H per epoch of each dynamic strategy),
  ``pareto.png`` (accuracy against bytes sent, a curve through H or a compression ratio per
  setting of everything else, the Pareto front marked),
  ``acc_vs_time.png`` (the same against modelled cluster time, :mod:`dpl.comm.clock`) and,
  when lr takes three or more values (an Optuna search), ``acc_vs_lr.png``. Each figure
  has a panel per dataset; a line joins only groups that differ in its own axis, each line
  has a colour of its own, an accuracy's interval is the logit interval (it stays in
  0-100 %, :func:`dpl.report.stats.describe_bounded`), and no figure is wider than 3:1 or
  taller than 1:2.

Usage::

    python -m dpl.report          # the latest sweep (its FINISHED runs); "dpl" where there is no sweep
    python -m dpl.report --experiment localsgd_grid
    python -m dpl.report --sweep dynamic_h --tracking-uri sqlite:////data/mlflow.db --out reports/dyn
    python -m dpl.report --experiment study_ablation --baseline ablation=none --target-acc 0.3
"""
