"""One run's life around the loop: its parts built (:mod:`~dpl.run.build`), trained, resumed or only
tested (:mod:`~dpl.run.job`), recorded beside the loop (:mod:`~dpl.run.recorder`, :mod:`~dpl.run.plots`),
checkpointed (:mod:`~dpl.run.checkpoint`), and stopped by a signal or a scheduler
(:mod:`~dpl.run.interrupt`, :mod:`~dpl.run.preempt`)."""
