"""Which parameters weight decay applies to: ``optimizer.decay_params``.

- ``all``: every parameter (torch's optimizers as they are; the image models' default, the study's).
- ``matrices``: only weight matrices and kernels. No decay on parameters of at most one dimension
  (biases, LayerNorm and BatchNorm weights), as nanoGPT's ``configure_optimizers`` (Karpathy: "all
  weight tensors in matmuls + embeddings decay, all biases and layernorms don't"), and none on the weights
  of ``nn.Embedding`` modules either, which nanoGPT does decay (they are 2-D): decay shrinks every row
  at every step while only the tokens of the batch get a gradient back, so it pulls rare tokens' rows
  towards 0.
  A GPT whose output layer is tied to its byte embedding leaves that shared matrix undecayed too.
- ``auto``: the model's default, a fact of its registration (:class:`dpl.components.models.ModelFacts`):
  ``matrices`` for the GPTs, ``all`` for the image models.

The decision is made on the model itself (a template, before the engine stacks it), so a parameter's
dimensions are its own, never the leading worker dimension [K, ...] of the stacked copies.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn


def decays(model: nn.Module, mode: str) -> list[bool]:
    """For each of ``model.parameters()`` (in that order, shared ones once): whether ``mode`` (``all`` |
    ``matrices``) decays it."""
    if mode == "all":
        return [True for _ in model.parameters()]
    if mode != "matrices":
        raise ValueError(f"optimizer.decay_params={mode!r} is invalid here: allowed all, matrices")
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return [p.dim() >= 2 and id(p) not in embeddings for p in model.parameters()]


def param_groups(params: Sequence[torch.Tensor], decayed: Sequence[bool]) -> list[Any]:
    """The optimizer's parameters: ``params`` as they are when every one decays (one group: the state_dict
    of a run before this option), else a group at the run's weight decay and one at 0 (empty ones left out)."""
    if len(params) != len(decayed):
        raise ValueError(f"{len(params)} parameters but {len(decayed)} decay flags")
    if all(decayed):
        return list(params)
    groups = [{"params": [p for p, d in zip(params, decayed) if d]},
              {"params": [p for p, d in zip(params, decayed) if not d], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
