"""What a run leaves behind, and where: the ``logger`` group (:mod:`~dpl.tracking.loggers`), the MLflow
store (:mod:`~dpl.tracking.store`), a run's params and digest (:mod:`~dpl.tracking.params`), its name
(:mod:`~dpl.tracking.run_names`), the results CSV (:mod:`~dpl.tracking.results`) and a sweep's parent run
(:mod:`~dpl.tracking.sweep`)."""
