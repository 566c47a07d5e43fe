"""Post-local SGD: synchronous first, local steps later."""

from __future__ import annotations

from dpl.core.methods.base import Now
from dpl.core.methods.outer import OuterStep
from dpl.core.workers import StackedWorkers


class PostLocal(OuterStep):
    """Post-local SGD (Lin et al. 2020, "Don't use large mini-batches, use local SGD", Sec. 3):
    synchronous gradient averaging in epochs ``< method.switch_epoch``, LocalSGD with H local
    steps from then on, in one run (``method.outer`` is its outer step, plain averaging by default).

    In the synchronous phase the workers stay equal, so the anchor of the outer step is
    moved along with them at each epoch start; the first local period then starts from the
    model of the switch.
    """

    edits_gradients = True  # in its synchronous epochs

    def on_epoch_start(self, workers: StackedWorkers, epoch: int) -> None:
        if epoch <= self.cfg.switch_epoch:
            self.reset_anchor(workers)
        super().on_epoch_start(workers, epoch)

    def on_gradients(self, workers: StackedWorkers, epoch: int) -> None:
        if epoch < self.cfg.switch_epoch:
            workers.average_grads_()

    def syncs_after(self, now: Now) -> bool:
        return now.epoch >= self.cfg.switch_epoch and super().syncs_after(now)

    def period_ends(self, now: Now) -> bool:
        # the synchronous epochs hold no period: the first local one starts with the switch
        return now.epoch < self.cfg.switch_epoch or super().period_ends(now)
