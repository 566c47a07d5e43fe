"""The algorithm, and nothing else: the loop (:mod:`~dpl.core.loop`) over workers held as stacked tensors
(:mod:`~dpl.core.workers`), their local step (:mod:`~dpl.core.step`), the methods that sync them
(:mod:`~dpl.core.methods`), the schedules of the lr and of H, and the training state. No Hydra, no files:
the parts arrive built (:mod:`dpl.run.build`) and what is recorded is the run's business (:mod:`dpl.run`)."""
