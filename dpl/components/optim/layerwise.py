"""LARS and LAMB: a layer-wise trust ratio on SGD momentum and on Adam moments.

LARS and LAMB scale each tensor's update by a *trust ratio* ||w|| / ||update||, so every
layer moves by a similar relative amount however large the batch (and so the lr) is.

Both support a ``per_worker`` mode for the one-process simulation of K workers, where
every parameter holds K independent replicas along a leading dimension [K, ...]: each
norm is then taken per worker slice, so one optimizer does exactly what K separate
optimizers on the slices would do. Elementwise optimizers (SGDM, AdamW) need nothing for
that mode. Gradient clipping is not theirs: the local step clips for every optimizer
(``optimizer.grad_clip_norm``, :mod:`dpl.components.optim.clip`).

The lr may be a float or a one-element tensor in ``param_group["lr"]`` (as torch's own
optimizers allow): the step only multiplies by it and never reads it on the host, so a
device-resident lr costs no synchronisation (and a captured CUDA graph can read it).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

# ----------------------------------------------------------------------------- norm helpers


def _norm(t: torch.Tensor, per_worker: bool) -> torch.Tensor:
    """The 2-norm of ``t``: a scalar, or shape [K] (one per worker slice) in per-worker mode."""
    if per_worker:
        return torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1)
    return torch.linalg.vector_norm(t)


def _expand(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-worker [K] vector to [K, 1, ...] so it broadcasts over ``like``."""
    if x.ndim == 0:
        return x
    return x.reshape(x.shape[0], *([1] * (like.ndim - 1)))


def _is_vector(p: torch.Tensor, per_worker: bool) -> bool:
    """Biases and norm weights: at most one dimension once the worker dimension is dropped.

    Scalars count too: like biases they have no fan-in to measure a layer's scale by.
    """
    return p.ndim - int(per_worker) <= 1


def _trust_ratio(num: torch.Tensor, den: torch.Tensor, valid: torch.Tensor,
                 max_ratio: Optional[float]) -> torch.Tensor:
    """``num / den`` clipped above by ``max_ratio``, and 1 where ``valid`` is False.

    The fallback 1 means "do not adapt" (a zero weight or update norm carries no scale
    information), so ``max_ratio`` clips only ratios that were actually computed.
    ``torch.where`` avoids a host sync and drops the inf/nan of the invalid entries.
    """
    ratio = num / den
    if max_ratio is not None:
        ratio = ratio.clamp(max=max_ratio)
    return torch.where(valid, ratio, torch.ones_like(ratio))


# ----------------------------------------------------------------------------- shared base


class _LayerwiseOptimizer(torch.optim.Optimizer):
    """1-D exclusion and the closure protocol shared by LARS and LAMB.

    ``per_worker`` is optimizer-wide (not per group): the storage layout is the model's.
    """

    def __init__(self, params, defaults: dict, per_worker: bool):
        lr = defaults["lr"]
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError(f"lr of shape {tuple(lr.shape)} is invalid: allowed a number or a one-element tensor")
        # a device lr is not read back here: checking its sign would cost the sync it exists to avoid
        if not (isinstance(lr, torch.Tensor) and lr.device.type != "cpu") and lr < 0:
            raise ValueError(f"lr={float(lr)} is invalid: allowed a number >= 0")
        if defaults["weight_decay"] < 0:
            raise ValueError(f"weight_decay={defaults['weight_decay']} is invalid: allowed a number >= 0")
        if defaults["eps"] <= 0:
            raise ValueError(f"eps={defaults['eps']} is invalid: allowed a number > 0")
        if defaults["max_trust_ratio"] is not None and defaults["max_trust_ratio"] <= 0:
            raise ValueError(f"max_trust_ratio={defaults['max_trust_ratio']} is invalid: allowed None or a number > 0")
        super().__init__(params, defaults)
        self.per_worker = per_worker

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None) -> Optional[torch.Tensor]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                adapt = not (group["exclude_1d"] and _is_vector(p, self.per_worker))
                self._update(p, p.grad, group, adapt)
        return loss

    def _update(self, p: torch.Tensor, g: torch.Tensor, group: dict, adapt: bool) -> None:
        raise NotImplementedError


# ----------------------------------------------------------------------------- LARS


class LARS(_LayerwiseOptimizer):
    """Layer-wise Adaptive Rate Scaling (You, Gitman & Ginsburg 2017, "Large Batch
    Training of Convolutional Networks", Algorithm 1).

    Per tensor, with local lr  λ = η ||w|| / (||g|| + β ||w|| + eps)  (eq. 6; η the
    trust coefficient, β the weight decay), the direction d = λ (g + β w) goes through
    heavy-ball momentum.  ``momentum_form`` says where the global lr γ enters:

    - ``"lr_inside"`` (default, Algorithm 1):  v ← m v + γ d;  w ← w − v.
    - ``"lr_outside"`` (torch.optim.SGD's form):  v ← m v + d;  w ← w − γ v.

    The two are the same trajectory while γ is constant (v differs by the factor γ); they
    differ only when γ changes between steps: inside, past steps keep the lr they were
    taken with; outside, a new lr rescales the whole buffer at once.

    With ``wd_in_grad_norm`` (the reference study's variant) the ratio is computed from
    d₀ = g + β w alone: λ = η ||w|| / (||d₀|| + eps), and the zero-norm test below uses
    ||d₀|| in place of ||g||.  λ = 1 when ||w|| or ||g|| is 0 (nothing to measure a scale
    by); tensors excluded by ``exclude_1d`` get λ = 1 and no weight decay.
    """

    MOMENTUM_FORMS = ("lr_inside", "lr_outside")

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, eps: float = 1e-8, exclude_1d: bool = True,
                 max_trust_ratio: Optional[float] = None, wd_in_grad_norm: bool = False,
                 momentum_form: str = "lr_inside", per_worker: bool = False):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum={momentum} is invalid: allowed 0 <= x < 1")
        if trust_coefficient <= 0:
            raise ValueError(f"trust_coefficient={trust_coefficient} is invalid: allowed a number > 0")
        if momentum_form not in self.MOMENTUM_FORMS:
            raise ValueError(f"momentum_form={momentum_form!r} is invalid: allowed one of "
                             + ", ".join(self.MOMENTUM_FORMS))
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, eps=eps, exclude_1d=exclude_1d,
                        max_trust_ratio=max_trust_ratio, wd_in_grad_norm=wd_in_grad_norm,
                        momentum_form=momentum_form)
        super().__init__(params, defaults, per_worker)

    def _update(self, p: torch.Tensor, g: torch.Tensor, group: dict, adapt: bool) -> None:
        wd = group["weight_decay"] if adapt else 0.0
        d = g.add(p, alpha=wd) if wd else g.clone()
        if adapt:
            w_norm = _norm(p, self.per_worker)
            if group["wd_in_grad_norm"]:
                den = _norm(d, self.per_worker)
                valid = (w_norm > 0) & (den > 0)
            else:
                g_norm = _norm(g, self.per_worker)
                den = g_norm + wd * w_norm
                valid = (w_norm > 0) & (g_norm > 0)
            ratio = _trust_ratio(group["trust_coefficient"] * w_norm, den + group["eps"],
                                 valid, group["max_trust_ratio"])
            d.mul_(_expand(ratio, p))
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf = state["momentum_buffer"]
        # multiply by the lr (never alpha=lr): a tensor lr then stays on its device
        if group["momentum_form"] == "lr_inside":
            buf.mul_(group["momentum"]).add_(d.mul_(group["lr"]))
            p.sub_(buf)
        else:
            buf.mul_(group["momentum"]).add_(d)
            p.sub_(buf * group["lr"])


# ----------------------------------------------------------------------------- LAMB


class LAMB(_LayerwiseOptimizer):
    """Layer-wise Adaptive Moments for Batch training (You et al. 2020, "Large Batch
    Optimization for Deep Learning: Training BERT in 76 minutes", Algorithm 2).

    m ← β1 m + (1−β1) g;  v ← β2 v + (1−β2) g²;  m̂ = m/(1−β1^t), v̂ = v/(1−β2^t)
    (skipped without ``bias_correction``);  r = m̂/(√v̂ + eps) + λ w  (decoupled weight
    decay on the update, not the gradient);  w ← w − lr (||w|| / ||r||) r, with the ratio
    1 when either norm is 0.  ``trust_ratio_only_with_wd`` (the study's variant) keeps the
    ratio at 1 for tensors whose weight decay is 0.

    The step count t is a float64 tensor on the parameter's device (``state["step"]``), so the
    step reads nothing on the host and a captured CUDA graph advances t on every replay.
    """

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, exclude_1d: bool = True, max_trust_ratio: Optional[float] = None,
                 bias_correction: bool = True, trust_ratio_only_with_wd: bool = False, per_worker: bool = False):
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas={tuple(betas)} is invalid: allowed two numbers in [0, 1)")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        exclude_1d=exclude_1d, max_trust_ratio=max_trust_ratio,
                        bias_correction=bias_correction, trust_ratio_only_with_wd=trust_ratio_only_with_wd)
        super().__init__(params, defaults, per_worker)

    def _update(self, p: torch.Tensor, g: torch.Tensor, group: dict, adapt: bool) -> None:
        state = self.state[p]
        if not state:
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        t = state["step"] = _step_count(state.get("step", 0), p.device)
        t += 1  # in place, on the device
        beta1, beta2 = group["betas"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        if group["bias_correction"]:
            # float64 powers of the device count: the very numbers Python's beta ** t gave
            m_hat, v_hat = m / (1 - beta1 ** t), v / (1 - beta2 ** t)
        else:
            m_hat, v_hat = m, v
        r = m_hat / (v_hat.sqrt() + group["eps"])
        wd = group["weight_decay"] if adapt else 0.0
        if wd:
            r.add_(p, alpha=wd)
        if adapt and not (group["trust_ratio_only_with_wd"] and wd == 0):
            w_norm, r_norm = _norm(p, self.per_worker), _norm(r, self.per_worker)
            ratio = _trust_ratio(w_norm, r_norm, (w_norm > 0) & (r_norm > 0), group["max_trust_ratio"])
            r.mul_(_expand(ratio, p))
        p.sub_(r.mul_(group["lr"]))  # not alpha=lr: a tensor lr stays on its device


def _step_count(step, device: torch.device) -> torch.Tensor:
    """LAMB's step count as a float64 tensor on ``device``: as stored, or converted once from a
    checkpoint that counted in a Python int (before the count moved to the device) or was
    loaded onto another device or dtype."""
    if not torch.is_tensor(step):  # made on the device (a fill, not a copy from the host: no sync)
        return torch.full((), float(step), dtype=torch.float64, device=device)
    if step.device == device and step.dtype == torch.float64:
        return step
    return step.to(device, torch.float64)
