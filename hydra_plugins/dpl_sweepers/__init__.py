"""dpl's Optuna sweeper: Hydra's, with failed and interrupted trials made explicit.

Hydra instantiates sweepers only from the ``hydra_plugins`` namespace, hence this package;
``sweeps/optuna_lr.yaml`` selects it with ``hydra.sweeper._target_``. See dpl/sweep.py.
"""

from __future__ import annotations

import datetime
import logging
from pathlib import Path
from typing import List

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper as _HydraOptunaSweeper
from omegaconf import OmegaConf

from dpl.sweep import fail_running_trials

log = logging.getLogger("dpl")


class OptunaSweeper(_HydraOptunaSweeper):
    """``hydra/sweeper: optuna`` with ``_target_: hydra_plugins.dpl_sweepers.OptunaSweeper``.

    A diverged job returns NaN, which Optuna records as a FAIL trial, so a diverged lr is
    never the best. The rest is Hydra's sweeper unchanged.
    """

    def sweep(self, arguments: List[str]) -> None:
        started = datetime.datetime.now()
        try:
            return super().sweep(arguments)
        except BaseException as e:
            study = self._study()
            if study is not None:
                fail_running_trials(study, since=started)
            # Optuna's "No trials are completed yet" (in memory) / "Record does not exist." (RDB storage)
            if isinstance(e, ValueError) and study is not None and not any(
                    t.state.name == "COMPLETE" for t in study.trials):
                self._no_best(study)
                return None
            raise

    def _study(self):
        import optuna

        impl = self.sweeper
        try:
            return optuna.load_study(study_name=impl.study_name, storage=impl.storage)
        except Exception:  # no storage (in-memory study) or it was never created
            return None

    def _no_best(self, study) -> None:
        states = [t.state.name for t in study.trials]
        message = (f"optuna: no trial of study {study.study_name} completed ({len(states)} trials: "
                   f"{states.count('FAIL')} failed or diverged): there are no best parameters")
        log.error(message)
        sweep_dir = Path(str(self.sweeper.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create({"name": "optuna", "best_params": None, "best_value": None,
                                         "note": message}), sweep_dir / "optimization_results.yaml")

