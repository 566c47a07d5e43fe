"""dpl's Optuna sweeper: Hydra's, with failed and interrupted trials made explicit, and
optionally several seeds per trial.

Hydra instantiates sweepers only from the ``hydra_plugins`` namespace, hence this package;
``sweeps/optuna_lr.yaml`` selects it with ``hydra/sweeper: dpl_optuna``, the schema stored
here (Hydra's ``optuna`` schema plus ``seeds``). See dpl.tracking.sweep.
"""

# No ``from __future__ import annotations``: Hydra's plugin scan runs this module before it is in
# sys.modules, where a dataclass with string annotations cannot be made.
import datetime
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from dpl.tracking.sweep import fail_running_trials
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper as _HydraOptunaSweeper

log = logging.getLogger("dpl")


class OptunaSweeper(_HydraOptunaSweeper):
    """``hydra/sweeper: dpl_optuna`` (or ``optuna`` with ``_target_: hydra_plugins.dpl_sweepers.OptunaSweeper``).

    A diverged job returns a non-number, which Optuna records as a FAIL trial, so a diverged lr
    is never the best. ``seeds``: see :class:`hydra_plugins.dpl_sweepers._impl.SeededOptunaSweeperImpl`. The rest is Hydra's
    sweeper unchanged.
    """

    def __init__(self, seeds: Optional[List[int]] = None, **kwargs: Any) -> None:
        # Hydra's __init__ does nothing but build its OptunaSweeperImpl from these arguments:
        # dpl's subclass of it is built instead. Imported here, as Hydra imports its own: Hydra imports
        # every plugin module (but those named _*) on every start, and Optuna's import takes seconds.
        from hydra_plugins.dpl_sweepers._impl import SeededOptunaSweeperImpl

        self.sweeper = SeededOptunaSweeperImpl(seeds=seeds, **kwargs)

    def sweep(self, arguments: List[str]) -> None:
        self.sweeper.check_no_seed(arguments)  # before any trial: an error here is no failed trial
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


@dataclass
class DplOptunaSweeperConf(OptunaSweeperConf):
    """``hydra/sweeper: dpl_optuna``: Hydra's Optuna schema, dpl's sweeper, and ``seeds``."""

    _target_: str = "hydra_plugins.dpl_sweepers.OptunaSweeper"
    # Seeds per trial: each trial runs once per seed and is scored by the mean. None: one job
    # per trial with the config's seed.
    seeds: Optional[List[int]] = None


ConfigStore.instance().store(group="hydra/sweeper", name="dpl_optuna", node=DplOptunaSweeperConf,
                             provider="dpl")
