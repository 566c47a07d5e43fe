"""dpl's Optuna sweeper loop, apart from the plugin module: Hydra imports every plugin module not named
``_*`` on every start, and this one imports Optuna (seconds), which only an Optuna sweep needs."""

from __future__ import annotations

from typing import Any, List, Optional

from dpl.errors import ConfigError
from dpl.tracking.sweep import check_seeds
from hydra_plugins.dpl_sweepers._seeds import SeedsLauncher
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl


class SeededOptunaSweeperImpl(OptunaSweeperImpl):
    """Hydra's sweeper loop with ``seeds``: each trial runs once per seed (``seed=<s>`` added
    to its overrides), as ordinary jobs of the sweep, and Optuna is told their mean; a trial
    with a failed or diverged seed is FAIL. ``seeds=None``: one job per trial, Hydra's way."""

    def __init__(self, seeds: Optional[List[int]] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seeds = check_seeds(seeds)
        if self.seeds is not None and len(self._get_directions()) > 1:
            raise ConfigError(f"hydra.sweeper.seeds={self.seeds} is invalid with several directions: "
                              "the mean over seeds is taken of one objective")

    def check_no_seed(self, arguments: List[str]) -> None:
        """With seeds, the sweep's own overrides and params must not set the seed (dpl's preflight
        says so first for a command line; this is for any other way in)."""
        if self.seeds is None:
            return
        for line in [*arguments, *self._parse_sweeper_params_config()]:
            if line.split("=", 1)[0].lstrip("+~") == "seed":
                raise ConfigError(f"{line} is invalid with hydra.sweeper.seeds={self.seeds}, which sets each "
                                  f"job's seed: drop one of them")

    def setup(self, **kwargs: Any) -> None:
        super().setup(**kwargs)
        if self.seeds is not None:
            self.launcher = SeedsLauncher(self.launcher, self.seeds)

    def _configure_trials(self, trials, search_space_distributions, fixed_params):
        overrides = super()._configure_trials(trials, search_space_distributions, fixed_params)
        if self.seeds is not None:
            self.launcher.trials = list(trials)  # for the per-seed values, set before the trials are told
        return overrides
