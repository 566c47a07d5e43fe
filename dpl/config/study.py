"""The reference study's departures from the papers, one named ablation each.

dpl's defaults follow the papers; the study's code behaves differently in a few places
(``conf/experiment/study/`` sets each of them; docs/study.md). Each
entry here names one such behaviour, the config keys that express it, and the paper's
values that switch it off. ``conf/ablation/<name>.yaml`` applies exactly those values on
top of a study row, and ``sweeps/study_ablation.yaml`` runs a row with each one in turn,
so a researcher sees what every departure costs.

Each ablation is registered here, its :class:`Departure` as its facts (``none``: the row as it is).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dpl.registry import Registry

ABLATIONS = Registry("ablation", "a study row with one of its departures from the papers undone")


@dataclass(frozen=True)
class Departure:
    """One study behaviour: what the study does, and the papers' values that undo it."""

    study: str  # what the study's code does
    paper: str  # what the papers (and dpl's defaults) do instead
    applies_to: str  # which rows it can change
    paper_values: dict[str, Any] = field(default_factory=dict)  # dotted config key -> the paper's value


ABLATIONS.add("none", None, None, Departure("the study row as it is", "-", "every row"), module=__name__)
ABLATIONS.add("lr_per_step", None, None, Departure(
    "lr stepped once per epoch", "lr moved after every optimizer step (Goyal et al. 2017)",
    "every row", {"scheduler.interval": "step"}), module=__name__)
ABLATIONS.add("warmup_ramp", None, None, Departure(
    "warmup from 0.1 x lr", "linear ramp (t+1)/W x lr, from near 0 (Goyal et al. 2017)",
    "rows with warmup (LARS, LAMB)", {"scheduler.warmup_start_factor": None}), module=__name__)
ABLATIONS.add("no_inner_restart", None, None, Departure(
    "fresh inner optimizers (zero momentum) every epoch", "inner momentum kept across epochs (Lin et al. 2020)",
    "local methods", {"restart_inner_each_epoch": False}), module=__name__)
ABLATIONS.add("no_epoch_end_sync", None, None, Departure(
    "every epoch ends with a sync of the workers", "a sync every H steps counted over the whole run "
    "(Lin et al. 2020, Alg. 1; Douillard et al. 2023, Alg. 1)", "local methods",
    {"sync_at_epoch_end": False}), module=__name__)
ABLATIONS.add("no_slowmo_restart", None, None, Departure(
    "SlowMo buffer zeroed every epoch", "slow momentum kept for the whole run (Wang et al. 2020, Alg. 1)",
    "slowmo rows", {"method.restart_each_epoch": False}), module=__name__)
ABLATIONS.add("clean_val", None, None, Departure(
    "validation on augmented images", "validation on the images as they are",
    "every row", {"dataset.augment_val": False}), module=__name__)
ABLATIONS.add("reshuffle_each_epoch", None, None, Departure(
    "centralized training reads the same order every epoch", "a new random order every epoch",
    "centralized rows", {"shuffle": "epoch"}), module=__name__)
ABLATIONS.add("paper_lars", None, None, Departure(
    "LARS ratio from ||g + wd w||, biases adapted", "ratio eta ||w|| / (||g|| + wd ||w||), biases and norms "
    "excluded (You et al. 2017, eq. 6)", "LARS rows",
    {"optimizer.wd_in_grad_norm": False, "optimizer.exclude_1d": True}), module=__name__)
