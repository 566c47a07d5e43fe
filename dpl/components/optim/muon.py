"""Muon for the 2-D weights, AdamW for the rest, on stacked workers."""

from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch
from torch.optim import _muon as torch_muon

# torch.optim.Muon's own Newton–Schulz coefficients and eps (its defaults), so the two step alike
_NS_DEFAULTS = inspect.signature(torch.optim.Muon.__init__).parameters
_NS_COEFFICIENTS, _NS_EPS = _NS_DEFAULTS["ns_coefficients"].default, _NS_DEFAULTS["eps"].default


class Muon(torch.optim.AdamW):
    """Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers"; Liu et al. 2025, "Muon is
    scalable for LLM training") for the 2-D weight matrices, AdamW for every other parameter (biases,
    convolutions), as ``torch.optim.Muon``'s docs recommend. The Muon step is torch's own
    (``torch.optim._muon``): the momentum buffer b ← μ b + (1 − μ) g, the update g + μ(b − g) with
    Nesterov (else b), orthogonalised by ``_zeropower_via_newtonschulz``, then w ← (1 − lr·λ) w −
    lr' · update with lr' = ``_adjust_lr``. torch's class takes only 2-D parameters; dpl's are stacked
    [K, out, in] (``per_worker``), so each worker's slice is orthogonalised on its own, and the lr may
    be a device tensor (the trainer's). The AdamW groups are torch's AdamW.step itself. Given param
    groups (a group without weight decay), each is split the same way and keeps its own weight decay.
    """

    def __init__(self, params, lr: float, weight_decay: float, momentum: float, nesterov: bool, ns_steps: int,
                 adjust_lr_fn: Optional[str], betas: tuple[float, float], eps: float, per_worker: bool) -> None:
        params = list(params)
        matrix = 3 if per_worker else 2

        def is_matrix(p: torch.Tensor) -> bool:
            return p.dim() == matrix

        # every given group (its own weight decay: dpl.components.optim.decay) split in its Muon and AdamW parts
        given = params if params and isinstance(params[0], dict) else [{"params": params}]
        groups = [{**g, "params": [p for p in g["params"] if is_matrix(p) is muon], "muon": muon}
                  for g in given for muon in (True, False)]
        super().__init__([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        for group in self.param_groups:
            group.update(momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn,
                         per_worker=per_worker)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None) -> Optional[torch.Tensor]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = self.param_groups
        for group in (g for g in groups if g["muon"]):
            lr, mu = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    # a step count as AdamW keeps one (its load_state_dict expects it in every state)
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["momentum_buffer"] = torch.zeros_like(p)
                state["step"] += 1
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mu)
                update = p.grad.lerp(buf, mu) if group["nesterov"] else buf
                slices = update if group["per_worker"] else update.unsqueeze(0)
                ortho = torch.stack([torch_muon._zeropower_via_newtonschulz(u, _NS_COEFFICIENTS, group["ns_steps"], _NS_EPS)
                                     for u in slices])
                ortho = ortho if group["per_worker"] else ortho[0]
                ratio = torch_muon._adjust_lr(1.0, group["adjust_lr_fn"], p.shape[-2:])
                p.mul_(1 - lr * group["weight_decay"])
                p.sub_(ortho.to(p.dtype) * (lr * ratio))  # Newton–Schulz answers in bf16; the step is fp32
        self.param_groups = [g for g in groups if not g["muon"]]
        try:
            super().step()
        finally:
            self.param_groups = groups
        return loss
