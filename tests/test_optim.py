"""LARS / LAMB against hand-computed values and against the reference study's optimizers,
per-worker mode against K separate optimizers, tensor lrs, the registry against
conf/optimizer/, and state_dict round trips; the gradient clip every optimizer gets
(``optimizer.grad_clip_norm``, applied before the step as the local step does) against
torch's ``clip_grad_norm_`` per worker, and the weight-decay groups (``optimizer.decay_params``).

Expected values come from plain Python arithmetic on lists (``_lars_ref`` /
``_lamb_ref`` restate the papers' update rules scalar by scalar), from per-tensor loops
that restate the study's formulas (``_study_lars`` / ``_study_lamb``, as docs/study.md describes the
study's code) and You et al.'s Algorithm 1 (``_paper_lars``), from torch,
or are written out as numbers, never from calling dpl.components.optim.
"""

from __future__ import annotations

import copy
import io
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from dpl.components.optim import OPTIMIZERS, LarsConfig, build_optimizer
from dpl.components.optim.clip import GradClip, grad_clip
from dpl.components.optim.decay import decays, param_groups
from dpl.components.optim.layerwise import LAMB, LARS
from dpl.components.optim.muon import Muon
from dpl.errors import ConfigError
from tests.conftest import compose_cfg

CONF = Path(__file__).resolve().parents[1] / "conf" / "optimizer"
D = torch.float64  # hand arithmetic is in Python floats (double)


# ----------------------------------------------------------------------------- references


def _n(xs: list[float]) -> float:
    return math.sqrt(sum(x * x for x in xs))


def _lars_ref(w, grads, lr, momentum, wd, tc, eps, adapt=True, wd_in_norm=False, max_ratio=None, scales=None,
              lr_inside=True):
    """Scalar LARS on one flat tensor: returns w after each gradient in ``grads``.

    ``lr`` is a number or one per step; ``lr_inside`` puts it in the momentum (You et al.
    2017, Algorithm 1), else it scales the buffer at the update (torch SGD's form).
    """
    w, buf = list(w), [0.0] * len(w)
    wd = wd if adapt else 0.0
    for i, g in enumerate(grads):
        s = 1.0 if scales is None else scales[i]
        lr_i = lr[i] if isinstance(lr, (list, tuple)) else lr
        g = [s * x for x in g]
        d = [gi + wd * wi for gi, wi in zip(g, w)]
        ratio = 1.0
        zero_test = _n(d) if wd_in_norm else _n(g)  # the study tests ||g + wd w||
        if adapt and _n(w) > 0 and zero_test > 0:
            den = _n(d) if wd_in_norm else _n(g) + wd * _n(w)
            ratio = tc * _n(w) / (den + eps)
            ratio = ratio if max_ratio is None else min(ratio, max_ratio)
        if lr_inside:
            buf = [momentum * b + lr_i * ratio * di for b, di in zip(buf, d)]
            w = [wi - b for wi, b in zip(w, buf)]
        else:
            buf = [momentum * b + ratio * di for b, di in zip(buf, d)]
            w = [wi - lr_i * b for wi, b in zip(w, buf)]
    return w


def _lamb_ref(w, grads, lr, b1, b2, eps, wd, adapt=True, bias_correction=True, only_with_wd=False,
              max_ratio=None, scales=None):
    """Scalar LAMB (Algorithm 2) on one flat tensor: returns w after the gradients."""
    w, m, v = list(w), [0.0] * len(w), [0.0] * len(w)
    wd = wd if adapt else 0.0
    for t, g in enumerate(grads, start=1):
        s = 1.0 if scales is None else scales[t - 1]
        g = [s * x for x in g]
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g)]
        v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g)]
        c1, c2 = (1 - b1 ** t, 1 - b2 ** t) if bias_correction else (1.0, 1.0)
        r = [(mi / c1) / (math.sqrt(vi / c2) + eps) + wd * wi for mi, vi, wi in zip(m, v, w)]
        ratio = 1.0
        if adapt and not (only_with_wd and wd == 0) and _n(w) > 0 and _n(r) > 0:
            ratio = _n(w) / _n(r)
            ratio = ratio if max_ratio is None else min(ratio, max_ratio)
        w = [wi - lr * ratio * ri for wi, ri in zip(w, r)]
    return w


def _clip_of(kw: dict):
    """The clip a test's ``grad_clip_norm`` asks for (popped from ``kw``), as the local step takes it before
    the optimizer's step (dpl.core.step), at LARS's and LAMB's grad_clip_eps 0: min(1, c / ||g||)."""
    clip = kw.pop("grad_clip_norm", None)
    return None if clip is None else GradClip(clip, eps=0.0)


def _clipped_step(opt, params, clip, per_worker=False):
    if clip is not None:
        clip([p.grad for p in params if p.grad is not None], per_worker=per_worker)
    opt.step()


def _run(opt_cls, shapes_values, grads_per_step, **kw):
    """Run ``opt_cls`` on fresh double tensors, setting the given grads each step (clipped first with
    ``grad_clip_norm``)."""
    params = [torch.tensor(v, dtype=D).reshape(s) for s, v in shapes_values]
    for p in params:
        p.requires_grad_(True)
    clip = _clip_of(kw)
    opt = opt_cls(params, **kw)
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = None if g is None else torch.tensor(g, dtype=D).reshape(p.shape)
        _clipped_step(opt, params, clip)
    return [p.detach().flatten().tolist() for p in params]


def _close(a, b, tol=1e-12):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert math.isclose(x, y, rel_tol=tol, abs_tol=tol), (a, b)


W0 = [0.5, -1.0, 2.0, 0.25]  # a 2x2 weight
B0 = [0.1, -0.3]  # a bias
GW = [[0.2, 0.1, -0.4, 0.3], [-0.1, 0.5, 0.2, 0.0], [0.3, -0.2, 0.1, 0.6], [0.05, 0.05, -0.3, 0.2]]
GB = [[0.5, -0.2], [0.1, 0.4], [-0.3, 0.3], [0.2, 0.2]]


# ----------------------------------------------------------------------------- LARS


def test_lars_one_step_by_hand():
    # ||w|| = 5, ||g|| = 1: ratio = 0.1 * 5 / (1 + eps), buf = ratio * g, w -= lr * buf
    (w,) = _run(LARS, [((1, 2), [3.0, 4.0])], [[[0.6, 0.8]]], lr=2.0, trust_coefficient=0.1, eps=1e-8)
    ratio = 0.5 / (1 + 1e-8)
    _close(w, [3.0 - 2.0 * ratio * 0.6, 4.0 - 2.0 * ratio * 0.8])


def test_lars_one_step_with_weight_decay_by_hand():
    # d = g + 0.1 w = (0.9, 1.2); ratio = 0.1 * 5 / (1 + 0.1 * 5 + eps)
    (w,) = _run(LARS, [((1, 2), [3.0, 4.0])], [[[0.6, 0.8]]], lr=1.0, weight_decay=0.1,
                trust_coefficient=0.1, eps=1e-8)
    ratio = 0.5 / (1.5 + 1e-8)
    _close(w, [3.0 - ratio * 0.9, 4.0 - ratio * 1.2])


def test_lars_wd_in_grad_norm_by_hand():
    # ||g + wd w|| = ||(0.9, 1.2)|| = 1.5 here too: pick w, g not parallel to tell them apart
    # w = (3, 4), g = (0.8, -0.6): d = (1.1, -0.2), ||d|| = sqrt(1.25); ||g|| + wd||w|| = 1.5
    kw = dict(lr=1.0, weight_decay=0.1, trust_coefficient=0.1, eps=1e-8)
    (w_in,) = _run(LARS, [((1, 2), [3.0, 4.0])], [[[0.8, -0.6]]], wd_in_grad_norm=True, **kw)
    (w_out,) = _run(LARS, [((1, 2), [3.0, 4.0])], [[[0.8, -0.6]]], **kw)
    r_in, r_out = 0.5 / (math.sqrt(1.25) + 1e-8), 0.5 / (1.5 + 1e-8)
    _close(w_in, [3.0 - r_in * 1.1, 4.0 + r_in * 0.2])
    _close(w_out, [3.0 - r_out * 1.1, 4.0 + r_out * 0.2])


@pytest.mark.parametrize("form", ["lr_inside", "lr_outside"])
@pytest.mark.parametrize("wd", [0.0, 0.05])
@pytest.mark.parametrize("wd_in_norm", [False, True])
def test_lars_several_steps(wd, wd_in_norm, form):
    kw = dict(lr=0.7, momentum=0.9, weight_decay=wd, trust_coefficient=0.3, eps=1e-8, momentum_form=form)
    w, b = _run(LARS, [((2, 2), W0), ((2,), B0)], list(zip(GW, GB)), wd_in_grad_norm=wd_in_norm, **kw)
    ref = dict(lr=0.7, momentum=0.9, wd=wd, tc=0.3, eps=1e-8, wd_in_norm=wd_in_norm,
               lr_inside=form == "lr_inside")
    _close(w, _lars_ref(W0, GW, **ref))
    _close(b, _lars_ref(B0, GB, adapt=False, **ref))  # bias: plain momentum SGD


def test_lars_zero_weight_and_zero_grad_use_ratio_one():
    kw = dict(lr=0.5, momentum=0.9, weight_decay=0.1, trust_coefficient=0.01)
    (w,) = _run(LARS, [((2, 2), [0.0] * 4)], [[[1.0, -2.0, 0.5, 0.0]]], **kw)
    _close(w, [-0.5, 1.0, -0.25, 0.0])  # ||w|| = 0: w = -lr * g
    (w,) = _run(LARS, [((2, 2), W0)], [[[0.0] * 4]], **kw)
    _close(w, [x - 0.5 * 0.1 * x for x in W0])  # ||g|| = 0: d = wd * w, unscaled


def test_lars_exclude_1d_on_and_off():
    kw = dict(lr=0.7, momentum=0.9, weight_decay=0.05, trust_coefficient=0.3, eps=1e-8)
    ref = dict(lr=0.7, momentum=0.9, wd=0.05, tc=0.3, eps=1e-8)
    (b_on,) = _run(LARS, [((2,), B0)], [[g] for g in GB], exclude_1d=True, **kw)
    (b_off,) = _run(LARS, [((2,), B0)], [[g] for g in GB], exclude_1d=False, **kw)
    _close(b_on, _lars_ref(B0, GB, adapt=False, **ref))
    _close(b_off, _lars_ref(B0, GB, adapt=True, **ref))
    assert not math.isclose(b_on[0], b_off[0], rel_tol=1e-6)


def test_lars_exclusion_with_user_param_groups():
    # the bias shares a group with a matrix and gets its own lr: still excluded
    w = torch.tensor(W0, dtype=D).reshape(2, 2).requires_grad_()
    b = torch.tensor(B0, dtype=D).requires_grad_()
    c = torch.tensor(B0, dtype=D).requires_grad_()
    opt = LARS([{"params": [w, b]}, {"params": [c], "lr": 0.2}], lr=0.7, weight_decay=0.05,
               trust_coefficient=0.3)
    for gw, gb in zip(GW, GB):
        w.grad, b.grad, c.grad = (torch.tensor(gw, dtype=D).reshape(2, 2), torch.tensor(gb, dtype=D),
                                  torch.tensor(gb, dtype=D))
        opt.step()
    ref = dict(momentum=0.9, wd=0.05, tc=0.3, eps=1e-8)
    _close(w.detach().flatten().tolist(), _lars_ref(W0, GW, lr=0.7, **ref))
    _close(b.detach().tolist(), _lars_ref(B0, GB, lr=0.7, adapt=False, **ref))
    _close(c.detach().tolist(), _lars_ref(B0, GB, lr=0.2, adapt=False, **ref))


def test_lars_max_trust_ratio_clips():
    # unclipped ratio = 1.0 * 5 / 1 = 5 > 2: the update uses 2
    (w,) = _run(LARS, [((1, 2), [3.0, 4.0])], [[[0.6, 0.8]]], lr=1.0, trust_coefficient=1.0,
                max_trust_ratio=2.0)
    _close(w, [3.0 - 2.0 * 0.6, 4.0 - 2.0 * 0.8])
    ref = _lars_ref(W0, GW, lr=0.7, momentum=0.9, wd=0.05, tc=1.0, eps=1e-8, max_ratio=1.5)
    (w,) = _run(LARS, [((2, 2), W0)], [[g] for g in GW], lr=0.7, weight_decay=0.05, trust_coefficient=1.0,
                max_trust_ratio=1.5)
    _close(w, ref)


def test_lars_after_the_clip_scales_all_grads_by_the_global_norm():
    # global norm over w's grad (3, 0) and b's grad (0, 4): 5 > clip 1, so both scale by 1/5;
    # the bias is excluded (ratio 1), so its update shows the scale directly
    w = torch.tensor([[1.0, 1.0]], dtype=D, requires_grad=True)
    b = torch.tensor([1.0, 1.0], dtype=D, requires_grad=True)
    opt = LARS([w, b], lr=1.0)
    w.grad = torch.tensor([[3.0, 0.0]], dtype=D)
    b.grad = torch.tensor([0.0, 4.0], dtype=D)
    _clipped_step(opt, [w, b], GradClip(1.0, eps=0.0))
    _close(b.detach().tolist(), [1.0, 1.0 - 0.8])
    _close(b.grad.tolist(), [0.0, 0.8])  # clipped in place: what the optimizer saw
    # below the threshold nothing changes
    b2 = torch.tensor([1.0, 1.0], dtype=D, requires_grad=True)
    opt2 = LARS([b2], lr=1.0)
    b2.grad = torch.tensor([0.0, 4.0], dtype=D)
    _clipped_step(opt2, [b2], GradClip(10.0, eps=0.0))
    _close(b2.detach().tolist(), [1.0, -3.0])


def test_lars_closure_and_missing_grads():
    w = torch.tensor([[3.0, 4.0]], dtype=D, requires_grad=True)
    frozen = torch.tensor([[1.0, 2.0]], dtype=D, requires_grad=True)
    opt = LARS([w, frozen], lr=1.0, trust_coefficient=0.1)

    def closure():
        opt.zero_grad()
        loss = (w * torch.tensor([[0.6, 0.8]], dtype=D)).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    _close([loss.item()], [5.0])
    _close(w.detach().flatten().tolist(), [3.0 - 0.5 / (1 + 1e-8) * 0.6, 4.0 - 0.5 / (1 + 1e-8) * 0.8])
    assert frozen.grad is None and torch.equal(frozen.detach(), torch.tensor([[1.0, 2.0]], dtype=D))
    assert frozen not in opt.state


# ----------------------------------------------------------------------------- LAMB


def test_lamb_one_step_by_hand():
    # step 1 with bias correction: m_hat = g, v_hat = g^2, so r = g / (|g| + eps) ≈ sign(g)
    eps = 1e-6
    g = [0.6, -0.8]
    r = [x / (abs(x) + eps) for x in g]
    ratio = 5.0 / _n(r)  # ||w|| / ||r||, about 5 / sqrt(2)
    (w,) = _run(LAMB, [((1, 2), [3.0, 4.0])], [[g]], lr=0.1)
    _close(w, [3.0 - 0.1 * ratio * r[0], 4.0 - 0.1 * ratio * r[1]])


def test_lamb_one_step_with_weight_decay_by_hand():
    # r = sign(g) + 0.5 w (eps 1e-6 aside): weight decay goes into r, not into g
    eps, wd = 1e-6, 0.5
    g, w0 = [0.6, -0.8], [3.0, 4.0]
    r = [x / (abs(x) + eps) + wd * wi for x, wi in zip(g, w0)]  # ≈ (2.5, 1.0)
    ratio = 5.0 / _n(r)
    (w,) = _run(LAMB, [((1, 2), w0)], [[g]], lr=0.1, weight_decay=wd)
    _close(w, [w0[i] - 0.1 * ratio * r[i] for i in range(2)])


def test_lamb_without_bias_correction_by_hand():
    # m = 0.1 g, v = 0.001 g^2: r = 0.1 g / (sqrt(0.001) |g| + eps)
    eps = 1e-6
    g = [0.6, -0.8]
    r = [0.1 * x / (math.sqrt(0.001) * abs(x) + eps) for x in g]
    ratio = 5.0 / _n(r)
    (w,) = _run(LAMB, [((1, 2), [3.0, 4.0])], [[g]], lr=0.1, bias_correction=False)
    _close(w, [3.0 - 0.1 * ratio * r[0], 4.0 - 0.1 * ratio * r[1]])


@pytest.mark.parametrize("wd", [0.0, 0.05])
@pytest.mark.parametrize("bias_correction", [True, False])
def test_lamb_several_steps(wd, bias_correction):
    kw = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-6, weight_decay=wd, bias_correction=bias_correction)
    w, b = _run(LAMB, [((2, 2), W0), ((2,), B0)], list(zip(GW, GB)), **kw)
    ref = dict(lr=0.01, b1=0.9, b2=0.99, eps=1e-6, wd=wd, bias_correction=bias_correction)
    _close(w, _lamb_ref(W0, GW, **ref))
    _close(b, _lamb_ref(B0, GB, adapt=False, **ref))  # bias: Adam without weight decay


def test_lamb_trust_ratio_only_with_wd():
    kw = dict(lr=0.01, eps=1e-6, trust_ratio_only_with_wd=True)
    ref = dict(lr=0.01, b1=0.9, b2=0.999, eps=1e-6, only_with_wd=True)
    (w0,) = _run(LAMB, [((2, 2), W0)], [[g] for g in GW], weight_decay=0.0, **kw)
    (w1,) = _run(LAMB, [((2, 2), W0)], [[g] for g in GW], weight_decay=0.05, **kw)
    _close(w0, _lamb_ref(W0, GW, wd=0.0, adapt=False, **ref))  # wd 0: plain Adam step, ratio 1
    _close(w1, _lamb_ref(W0, GW, wd=0.05, **ref))
    # by hand for wd 0, one step: w -= lr * g / (|g| + eps)
    (w,) = _run(LAMB, [((1, 2), [3.0, 4.0])], [[[0.6, -0.8]]], weight_decay=0.0, **kw)
    _close(w, [3.0 - 0.01 * 0.6 / (0.6 + 1e-6), 4.0 + 0.01 * 0.8 / (0.8 + 1e-6)])


def test_lamb_zero_weight_and_zero_grad():
    # ||w|| = 0: ratio 1, w = -lr * g / (|g| + eps)
    (w,) = _run(LAMB, [((1, 2), [0.0, 0.0])], [[[0.6, -0.8]]], lr=0.1, weight_decay=0.5)
    _close(w, [-0.1 * 0.6 / (0.6 + 1e-6), 0.1 * 0.8 / (0.8 + 1e-6)])
    # g = 0 and wd = 0: r = 0, so the ratio falls back to 1 and nothing moves (no nan)
    (w,) = _run(LAMB, [((1, 2), [3.0, 4.0])], [[[0.0, 0.0]]], lr=0.1)
    assert w == [3.0, 4.0]
    # g = 0 with wd: r = wd w, ratio = ||w|| / (wd ||w||), so w <- (1 - lr) w
    (w,) = _run(LAMB, [((1, 2), [3.0, 4.0])], [[[0.0, 0.0]]], lr=0.1, weight_decay=0.5)
    _close(w, [2.7, 3.6])


def test_lamb_exclude_1d_on_and_off():
    ref = dict(lr=0.01, b1=0.9, b2=0.999, eps=1e-6, wd=0.05)
    (b_on,) = _run(LAMB, [((2,), B0)], [[g] for g in GB], lr=0.01, weight_decay=0.05, exclude_1d=True)
    (b_off,) = _run(LAMB, [((2,), B0)], [[g] for g in GB], lr=0.01, weight_decay=0.05, exclude_1d=False)
    _close(b_on, _lamb_ref(B0, GB, adapt=False, **ref))
    _close(b_off, _lamb_ref(B0, GB, adapt=True, **ref))
    assert not math.isclose(b_on[0], b_off[0], rel_tol=1e-6)


def test_lamb_max_trust_ratio_clips():
    # one step: r ≈ (1, -1), ||w|| / ||r|| ≈ 5 / sqrt(2) ≈ 3.5 > 2
    g = [0.6, -0.8]
    r = [x / (abs(x) + 1e-6) for x in g]
    (w,) = _run(LAMB, [((1, 2), [3.0, 4.0])], [[g]], lr=0.1, max_trust_ratio=2.0)
    _close(w, [3.0 - 0.2 * r[0], 4.0 - 0.2 * r[1]])
    (w,) = _run(LAMB, [((2, 2), W0)], [[g] for g in GW], lr=0.01, weight_decay=0.05, max_trust_ratio=0.5)
    _close(w, _lamb_ref(W0, GW, lr=0.01, b1=0.9, b2=0.999, eps=1e-6, wd=0.05, max_ratio=0.5))


def test_lamb_grad_clip_norm():
    # eps = 1 makes r = s g / (s |g| + 1) depend on the clip scale s; global norm is
    # ||(0.3, 0.4, 1.2)|| = 1.3 > 0.65, so s = 0.5 for the first step, and ||.|| <= 0.65 next
    grads = [([0.3, 0.4], [1.2, 0.0]), ([0.1, 0.2], [0.3, 0.0])]
    kw = dict(lr=0.1, eps=1.0, weight_decay=0.1, grad_clip_norm=0.65)
    w, b = _run(LAMB, [((1, 2), [3.0, 4.0]), ((2,), [1.0, 1.0])], grads, **kw)
    ref = dict(lr=0.1, b1=0.9, b2=0.999, eps=1.0, wd=0.1, scales=[0.5, 1.0])
    _close(w, _lamb_ref([3.0, 4.0], [g[0] for g in grads], **ref))
    _close(b, _lamb_ref([1.0, 1.0], [g[1] for g in grads], adapt=False, **ref))
    # first bias step by hand: g = 0.6 after clipping, r = 0.6 / 1.6
    (b1,) = _run(LAMB, [((2,), [1.0, 1.0])], [[[1.2, 0.0]]], lr=0.1, eps=1.0, grad_clip_norm=0.6)
    _close(b1, [1.0 - 0.1 * 0.6 / 1.6, 1.0])


# ----------------------------------------------------------------------------- the study's LARS and LAMB
# The study's code's LARS and LAMB (docs/study.md), restated per tensor below; dpl's LARS/LAMB with
# these flags must take the same steps.

STUDY_LARS = dict(momentum=0.9, trust_coefficient=0.3, eps=1e-6, wd_in_grad_norm=True, exclude_1d=False,
                  max_trust_ratio=None, grad_clip_norm=None, momentum_form="lr_inside")
STUDY_LAMB = dict(betas=(0.9, 0.999), eps=1e-6, grad_clip_norm=1.0, bias_correction=False,
                  trust_ratio_only_with_wd=True, exclude_1d=False, max_trust_ratio=None)


def _study_lars(ws, grads, lrs, wd, eta=0.3, eps=1e-6, m=0.9):
    """The study's LARS: g <- g + wd w; trust = eta ||w|| / (||g|| + eps) if both norms > 0
    else 1; v <- m v + lr trust g; w <- w - v. Every tensor, biases included."""
    ws, vs = [w.clone() for w in ws], [torch.zeros_like(w) for w in ws]
    for step_grads, lr in zip(grads, lrs):
        for i, g in enumerate(step_grads):
            w = ws[i]
            g = g + wd * w
            w_norm, g_norm = float(w.norm()), float(g.norm())
            trust = eta * w_norm / (g_norm + eps) if w_norm > 0 and g_norm > 0 else 1.0
            vs[i] = m * vs[i] + lr * trust * g
            ws[i] = w - vs[i]
    return ws


def _study_lamb(ws, grads, lrs, wd, b1=0.9, b2=0.999, eps=1e-6, clip=1.0):
    """The study's LAMB: global grad norm clipped to 1; Adam moments, no bias correction;
    u = m / (sqrt(v) + eps); only if wd != 0: u += wd w and u *= ||w|| / ||u||; w <- w - lr u."""
    ws = [w.clone() for w in ws]
    ms, vs = [torch.zeros_like(w) for w in ws], [torch.zeros_like(w) for w in ws]
    for step_grads, lr in zip(grads, lrs):
        total = math.sqrt(sum(float(g.norm()) ** 2 for g in step_grads))
        scale = clip / total if total > clip else 1.0
        for i, g in enumerate(step_grads):
            g, w = g * scale, ws[i]
            ms[i] = b1 * ms[i] + (1 - b1) * g
            vs[i] = b2 * vs[i] + (1 - b2) * g * g
            u = ms[i] / (vs[i].sqrt() + eps)
            if wd != 0:
                u = u + wd * w
                u = u * (float(w.norm()) / float(u.norm()))
            ws[i] = w - lr * u
    return ws


def _paper_lars(ws, grads, lrs, wd, eta, eps, m, adapt):
    """You et al. 2017, Algorithm 1 (with dpl's eps and ratio 1 on a zero norm):
    lambda = eta ||w|| / (||g|| + wd ||w|| + eps); v <- m v + lr lambda (g + wd w); w <- w - v.
    ``adapt[i]`` False (biases under exclude_1d): lambda = 1 and no weight decay."""
    ws, vs = [w.clone() for w in ws], [torch.zeros_like(w) for w in ws]
    for step_grads, lr in zip(grads, lrs):
        for i, g in enumerate(step_grads):
            w = ws[i]
            local = 1.0
            decay = wd if adapt[i] else 0.0
            if adapt[i] and float(w.norm()) > 0 and float(g.norm()) > 0:
                local = eta * float(w.norm()) / (float(g.norm()) + wd * float(w.norm()) + eps)
            vs[i] = m * vs[i] + lr * local * (g + decay * w)
            ws[i] = w - vs[i]
    return ws


STUDY_SHAPES = [(6, 5), (6,), (4, 3, 3, 3)]  # a weight matrix, its bias, a conv kernel
LRS_LARS = [1.5, 4.2, 6.9, 9.6, 15.0, 14.1]  # a warmup from 0.1 x 15, then a decay
LRS_LAMB = [8e-4, 2.2e-3, 3.6e-3, 8e-3, 7.1e-3, 5e-3]


def _study_tensors(seed=0, steps=6, zero_grad_at=None):
    gen = torch.Generator().manual_seed(seed)
    ws = [torch.randn(s, generator=gen, dtype=D) for s in STUDY_SHAPES]
    grads = [[torch.randn(s, generator=gen, dtype=D) * 3 for s in STUDY_SHAPES] for _ in range(steps)]
    if zero_grad_at is not None:  # the gradient alone is 0, w and wd are not
        step, i = zero_grad_at
        grads[step][i].zero_()
    return ws, grads


def _dpl_steps(make, ws, grads, lrs, lr_as_tensor=False, clip=None, **kw):
    """dpl's optimizer ``make(params, **kw)`` over copies of ``ws``: one step per entry of
    ``grads``, with the lr of ``lrs`` set in every group first (a 0-dim tensor if asked), the
    gradients clipped first by ``clip`` (or by ``grad_clip_norm``) as the local step does."""
    params = [w.clone().requires_grad_() for w in ws]
    clip = clip or _clip_of(kw)
    opt = make(params, **kw)
    for step_grads, lr in zip(grads, lrs):
        for group in opt.param_groups:  # as dpl's trainer sets the scheduled lr
            group["lr"] = torch.tensor(lr, dtype=D) if lr_as_tensor else lr
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        _clipped_step(opt, params, clip)
    return [p.detach() for p in params]


def _assert_all_close(got, want, atol=1e-9):
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0.0, atol=atol)


@pytest.mark.parametrize("wd", [1e-3, 0.05])
def test_lars_with_study_flags_equals_the_studys_lars(wd):
    ws, grads = _study_tensors(zero_grad_at=(2, 1))
    got = _dpl_steps(LARS, ws, grads, LRS_LARS, lr=LRS_LARS[0], weight_decay=wd, **STUDY_LARS)
    _assert_all_close(got, _study_lars(ws, grads, LRS_LARS, wd))


def test_lars_study_zero_test_is_on_g_plus_wd_w():
    # the raw gradient is 0 but g + wd w is not: the study still adapts (eta ||w|| / (wd ||w|| + eps)),
    # where the paper's form falls back to 1; one step from zero momentum tells them apart
    w, wd, lr = torch.tensor([[3.0, 4.0]], dtype=D), 0.1, 2.0
    (got,) = _dpl_steps(LARS, [w], [[torch.zeros_like(w)]], [lr], lr=lr, weight_decay=wd, **STUDY_LARS)
    trust = 0.3 * 5.0 / (0.1 * 5.0 + 1e-6)
    torch.testing.assert_close(got, w - lr * trust * wd * w, rtol=0.0, atol=1e-12)


@pytest.mark.parametrize("wd", [0.0, 1e-3, 0.05])
def test_lamb_with_study_flags_equals_the_studys_lamb(wd):
    ws, grads = _study_tensors(seed=1)
    got = _dpl_steps(LAMB, ws, grads, LRS_LAMB, lr=LRS_LAMB[0], weight_decay=wd, **STUDY_LAMB)
    _assert_all_close(got, _study_lamb(ws, grads, LRS_LAMB, wd))


def test_study_lamb_clipping_is_active_in_that_test():
    # the study test above is only a test of the clip if the global norm exceeds 1.0
    _, grads = _study_tensors(seed=1)
    assert all(math.sqrt(sum(float(g.norm()) ** 2 for g in step)) > 1.0 for step in grads)


def _study_rows(optimizer: str) -> list[str]:
    rows = sorted((CONF.parent / "experiment" / "study").glob("*.yaml"))
    return [f"study/{r.stem}" for r in rows if f"override /optimizer: {optimizer}" in r.read_text()]


@pytest.mark.parametrize("row", _study_rows("lars"))
def test_every_study_lars_row_builds_the_studys_lars(row):
    cfg = compose_cfg(f"experiment={row}", tiny=False)
    ws, grads = _study_tensors(seed=2, zero_grad_at=(1, 1))
    lrs = [cfg.lr * f for f in (0.1, 0.4, 0.7, 1.0, 0.95)]
    assert grad_clip(cfg.optimizer) is None  # the study's LARS does not clip
    got = _dpl_steps(lambda ps: build_optimizer(ps, cfg.optimizer, cfg.lr, cfg.weight_decay), ws, grads, lrs)
    _assert_all_close(got, _study_lars(ws, grads, lrs, cfg.weight_decay))


@pytest.mark.parametrize("row", _study_rows("lamb"))
def test_every_study_lamb_row_builds_the_studys_lamb(row):
    cfg = compose_cfg(f"experiment={row}", tiny=False)
    ws, grads = _study_tensors(seed=3)
    lrs = [cfg.lr * f for f in (0.1, 0.4, 0.7, 1.0, 0.95)]
    # the clip the local step applies for the row's optimizer node: 1.0, at LAMB's grad_clip_eps 0
    clip = grad_clip(cfg.optimizer)
    assert clip == GradClip(1.0, eps=0.0)
    got = _dpl_steps(lambda ps: build_optimizer(ps, cfg.optimizer, cfg.lr, cfg.weight_decay), ws, grads, lrs,
                     clip=clip)
    _assert_all_close(got, _study_lamb(ws, grads, lrs, cfg.weight_decay))


def test_study_rows_exist_for_both_optimizers():
    assert _study_rows("lars") and _study_rows("lamb")


# ----------------------------------------------------------------------------- LARS momentum forms


@pytest.mark.parametrize("wd", [0.0, 5e-3])
def test_default_lars_is_you_et_al_algorithm_1(wd):
    ws, grads = _study_tensors(seed=4)
    lrs = [0.3, 1.1, 2.0, 1.7, 0.6, 0.2]
    kw = dict(momentum=0.9, trust_coefficient=0.02, eps=1e-8)
    got = _dpl_steps(LARS, ws, grads, lrs, lr=lrs[0], weight_decay=wd, **kw)  # default flags otherwise
    adapt = [len(s) > 1 for s in STUDY_SHAPES]  # exclude_1d: the bias is plain momentum SGD
    _assert_all_close(got, _paper_lars(ws, grads, lrs, wd, eta=0.02, eps=1e-8, m=0.9, adapt=adapt))


def test_lr_outside_form_is_still_available():
    # v <- m v + d; w <- w - lr v: a changed lr rescales the whole buffer
    kw = dict(momentum=0.9, weight_decay=0.05, trust_coefficient=0.3, eps=1e-8, momentum_form="lr_outside")
    lrs = [0.2, 0.9, 0.5, 1.3]
    params = [torch.tensor(W0, dtype=D).reshape(2, 2).requires_grad_()]
    opt = LARS(params, lr=lrs[0], **kw)
    for g, lr in zip(GW, lrs):
        opt.param_groups[0]["lr"] = lr
        params[0].grad = torch.tensor(g, dtype=D).reshape(2, 2)
        opt.step()
    ref = dict(momentum=0.9, wd=0.05, tc=0.3, eps=1e-8)
    _close(params[0].detach().flatten().tolist(), _lars_ref(W0, GW, lr=lrs, lr_inside=False, **ref))
    assert not math.isclose(params[0].flatten()[0].item(), _lars_ref(W0, GW, lr=lrs, **ref)[0], rel_tol=1e-6)


def test_lars_forms_agree_at_constant_lr_and_differ_when_it_changes():
    ws, grads = _study_tensors(seed=5)
    kw = dict(momentum=0.9, weight_decay=1e-3, trust_coefficient=0.02)
    for lrs, same in (([0.8] * 6, True), ([0.2, 0.8, 1.4, 0.8, 0.2, 0.1], False)):
        inside = _dpl_steps(LARS, ws, grads, lrs, lr=lrs[0], momentum_form="lr_inside", **kw)
        outside = _dpl_steps(LARS, ws, grads, lrs, lr=lrs[0], momentum_form="lr_outside", **kw)
        for a, b in zip(inside, outside):
            assert torch.allclose(a, b, rtol=0, atol=1e-12) is same


def test_bad_momentum_form_is_one_clear_error():
    with pytest.raises(ValueError, match=r"^momentum_form='lr_in' is invalid: allowed one of lr_inside, lr_outside$"):
        LARS([torch.ones(2, requires_grad=True)], lr=0.1, momentum_form="lr_in")
    with pytest.raises(ConfigError, match=r"^optimizer.momentum_form='x' is invalid: allowed one of lr_inside, "
                                          r"lr_outside$"):
        LarsConfig(name="lars", momentum_form="x")


def test_momentum_form_reaches_lars_from_the_config():
    for form in ("lr_inside", "lr_outside"):
        cfg = OmegaConf.merge(_cfg("lars"), {"momentum_form": form})
        opt = build_optimizer([torch.ones(2, 2, requires_grad=True)], cfg, lr=0.1, weight_decay=0.0)
        assert opt.param_groups[0]["momentum_form"] == form
    assert _cfg("lars").momentum_form == "lr_inside"


def test_lars_state_dict_without_the_form_loads_as_lr_outside():
    # a checkpoint from before the option holds an lr-outside buffer: it resumes in that form
    from dpl.run.checkpoint import upgrade

    w = torch.ones(2, 2, requires_grad=True)
    state = LARS([w], lr=0.1).state_dict()
    del state["param_groups"][0]["momentum_form"]
    old = {"format": 1, "config": {"optimizer": {"name": "lars"}}, "state": {}, "method": {}, "optimizer": state}
    opt = LARS([w], lr=0.1)
    opt.load_state_dict(upgrade(old)["optimizer"])
    assert opt.param_groups[0]["momentum_form"] == "lr_outside"


# ----------------------------------------------------------------------------- tensor lr


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("opt", ["lr_inside", "lr_outside", "lamb"])
def test_tensor_lr_equals_float_lr(opt, dtype):
    ws, grads = _study_tensors(seed=6)
    ws, grads = [w.to(dtype) for w in ws], [[g.to(dtype) for g in step] for step in grads]
    if opt == "lamb":
        cls, lrs, kw = LAMB, LRS_LAMB, dict(STUDY_LAMB, weight_decay=1e-3)
    else:
        cls, lrs, kw = LARS, LRS_LARS, dict(STUDY_LARS, weight_decay=1e-3, momentum_form=opt)
    as_float = _dpl_steps(cls, ws, grads, lrs, lr=lrs[0], **kw)
    as_tensor = _dpl_steps(cls, ws, grads, lrs, lr=torch.tensor(lrs[0], dtype=dtype), lr_as_tensor=True, **kw)
    for a, b in zip(as_float, as_tensor):
        assert torch.equal(a, b), (a - b).abs().max()  # same arithmetic, bit for bit


@pytest.mark.parametrize("per_worker", [False, True])
def test_step_never_reads_a_tensor_lr_on_the_host(per_worker):
    # on the meta device any host read (.item(), bool(), alpha=tensor) raises, so a step that
    # runs there would not sync a CUDA lr either
    lead = (K,) if per_worker else ()
    for cls, kw in ((LARS, dict(STUDY_LARS, momentum_form="lr_inside")),
                    (LARS, dict(STUDY_LARS, momentum_form="lr_outside", grad_clip_norm=1.0, max_trust_ratio=2.0)),
                    (LARS, dict(momentum=0.9, trust_coefficient=0.01)),
                    (LAMB, dict(STUDY_LAMB, max_trust_ratio=2.0)),
                    (LAMB, dict())):
        params = [torch.empty(lead + s, device="meta", requires_grad=True) for s in STUDY_SHAPES]
        kw = dict(kw)
        clip = _clip_of(kw)  # the local step's clip, which must not read the host either
        opt = cls(params, lr=0.1, weight_decay=1e-3, per_worker=per_worker, **kw)
        opt.param_groups[0]["lr"] = torch.tensor(0.1, device="meta")
        for p in params:
            p.grad = torch.empty_like(p)
        _clipped_step(opt, params, clip, per_worker)
        _clipped_step(opt, params, clip, per_worker)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA to observe a device sync")
def test_step_with_cuda_lr_does_not_synchronize():
    params = [torch.randn(s, device="cuda", requires_grad=True) for s in STUDY_SHAPES]
    for cls, kw in ((LARS, STUDY_LARS), (LARS, dict(STUDY_LARS, momentum_form="lr_outside")), (LAMB, STUDY_LAMB)):
        kw = dict(kw)
        clip = _clip_of(kw)
        opt = cls(params, lr=0.1, weight_decay=1e-3, **kw)
        opt.param_groups[0]["lr"] = torch.tensor(0.1, device="cuda")
        for p in params:
            p.grad = torch.randn_like(p)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            _clipped_step(opt, params, clip)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_lamb_counts_steps_on_the_device_and_resumes_a_python_int_count():
    """LAMB's step count is a float64 tensor beside its parameter (nothing read on the host, so a
    captured step advances it); a checkpoint written when it was a Python int resumes to the same bits."""
    def fresh():
        w = torch.tensor(W0, dtype=torch.float32).reshape(2, 2).requires_grad_(True)
        return w, LAMB([w], lr=0.1, weight_decay=0.01)

    def steps(w, opt, grads):
        for g in grads:
            w.grad = torch.tensor(g, dtype=torch.float32).reshape(2, 2)
            opt.step()

    w, opt = fresh()
    steps(w, opt, GW[:2])
    count = opt.state[w]["step"]
    assert torch.is_tensor(count) and count.dtype == torch.float64 and count.device == w.device and count == 2
    saved = copy.deepcopy(opt.state_dict())  # a checkpoint: the state's tensors as they are now
    steps(w, opt, GW[2:])
    w2, opt2 = fresh()
    steps(w2, opt2, GW[:2])
    saved["state"][0]["step"] = 2  # as checkpoints stored it before the count moved to the device
    opt2.load_state_dict(saved)
    steps(w2, opt2, GW[2:])
    assert torch.equal(w2, w) and opt2.state[w2]["step"] == 4


def test_constructor_accepts_a_tensor_lr_and_rejects_a_vector():
    w = torch.ones(2, 2, requires_grad=True)
    assert torch.equal(LAMB([w], lr=torch.tensor(0.01)).param_groups[0]["lr"], torch.tensor(0.01))
    with pytest.raises(ValueError, match="allowed a number or a one-element tensor"):
        LARS([w], lr=torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match=r"lr=-0.5 is invalid"):
        LARS([w], lr=torch.tensor(-0.5))


# ----------------------------------------------------------------------------- per-worker mode

K = 3
SHAPES = [(4, 3), (4,), (2, 2, 3), ()]  # a weight, a bias, a conv-like kernel, a scalar


def _per_worker_vs_separate(opt_cls, steps=4, lrs=None, **kw):
    """``lrs``: an lr per step, set in every param group before the step (as the trainer does)."""
    gen = torch.Generator().manual_seed(0)
    stacked = [torch.randn((K, *s), generator=gen) for s in SHAPES]
    stacked[0][1].zero_()  # worker 1 starts with a zero weight: ratio 1 on that slice only
    grads = [[torch.randn((K, *s), generator=gen) * (1 + 3 * torch.arange(K).reshape(K, *[1] * len(s)))
              for s in SHAPES] for _ in range(steps)]
    grads[0][2][2].zero_()  # a zero gradient on one slice of one tensor
    clip = _clip_of(kw)  # the local step's, per worker: K separate clips on the slices
    if clip is not None:  # the threshold must clip some workers and not others
        norms = torch.stack([g.reshape(K, -1).square().sum(1) for g in grads[0]]).sum(0).sqrt()
        assert norms.min() < clip.max_norm < norms.max()
    joint = [p.clone().requires_grad_() for p in stacked]
    solo = [[p[k].clone().requires_grad_() for p in stacked] for k in range(K)]
    opt = opt_cls(joint, per_worker=True, **kw)
    opts = [opt_cls(ps, **kw) for ps in solo]
    for i, step_grads in enumerate(grads):
        if lrs is not None:
            for o in (opt, *opts):
                for group in o.param_groups:
                    group["lr"] = lrs[i]
        for p, g in zip(joint, step_grads):
            p.grad = g.clone()
        _clipped_step(opt, joint, clip, per_worker=True)
        for k in range(K):
            for p, g in zip(solo[k], step_grads):
                p.grad = g[k].clone()
            _clipped_step(opts[k], solo[k], clip)
    for i, p in enumerate(joint):
        want = torch.stack([solo[k][i].detach() for k in range(K)])
        # bitwise: per-slice norms reduce the same elements in the same order
        assert torch.equal(p.detach(), want), (p.detach() - want).abs().max()
    return joint, stacked


@pytest.mark.parametrize("form", ["lr_inside", "lr_outside"])
@pytest.mark.parametrize("clip", [None, 10.0])
def test_lars_per_worker_equals_separate_optimizers(clip, form):
    joint, start = _per_worker_vs_separate(LARS, lr=0.5, weight_decay=0.01, trust_coefficient=0.1,
                                          max_trust_ratio=0.05, grad_clip_norm=clip, momentum_form=form)
    assert all(not torch.equal(p.detach(), s) for p, s in zip(joint, start))


@pytest.mark.parametrize("form", ["lr_inside", "lr_outside"])
def test_lars_per_worker_with_changing_lr(form):
    _per_worker_vs_separate(LARS, lrs=[0.1, 0.4, 0.7, 0.3], lr=0.5, weight_decay=0.01, trust_coefficient=0.1,
                            momentum_form=form)


def test_lars_per_worker_with_changing_lr_and_study_flags():
    _per_worker_vs_separate(LARS, lrs=[1.5, 6.0, 15.0, 9.0], lr=1.5, **STUDY_LARS, weight_decay=1e-3)


def test_lamb_per_worker_with_changing_lr_and_study_flags():
    # clip 10 rather than the study's 1.0: the helper wants some workers clipped and some not
    _per_worker_vs_separate(LAMB, lrs=[1e-3, 4e-3, 8e-3, 6e-3], lr=1e-3, **{**STUDY_LAMB, "grad_clip_norm": 10.0},
                            weight_decay=1e-3)


@pytest.mark.parametrize("clip", [None, 10.0])
def test_lamb_per_worker_equals_separate_optimizers(clip):
    _per_worker_vs_separate(LAMB, lr=0.01, weight_decay=0.05, max_trust_ratio=0.9, grad_clip_norm=clip)
    _per_worker_vs_separate(LAMB, lr=0.01, weight_decay=0.0, trust_ratio_only_with_wd=True,
                            bias_correction=False, exclude_1d=False, grad_clip_norm=clip)


def test_lars_per_worker_wd_in_grad_norm():
    _per_worker_vs_separate(LARS, lr=0.5, weight_decay=0.01, trust_coefficient=0.1, wd_in_grad_norm=True,
                            exclude_1d=False, grad_clip_norm=10.0)


# ----------------------------------------------------------------------------- registry


def _cfg(name: str):
    return compose_cfg(f"optimizer={name}", tiny=False).optimizer


def test_registry_keys_are_the_yaml_names():
    assert set(OPTIMIZERS) == {f.stem for f in CONF.glob("*.yaml")}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_build_every_optimizer_from_its_yaml(name):
    cfg = _cfg(name)
    w = torch.ones(2, 2, requires_grad=True)
    opt = build_optimizer([w], cfg, lr=0.3, weight_decay=0.02)
    kind = {"sgdm": torch.optim.SGD, "adamw": torch.optim.AdamW, "lars": LARS, "lamb": LAMB, "muon": Muon}[name]
    assert type(opt) is kind
    group = opt.param_groups[0]
    assert group["lr"] == 0.3 and group["weight_decay"] == 0.02  # the top-level values, not the YAML's
    if name == "lars":
        assert group["trust_coefficient"] == cfg.trust_coefficient
    if name == "muon":
        assert group["muon"] and group["momentum"] == cfg.momentum  # a 2-D weight without a worker axis
    if name in ("adamw", "lamb", "muon"):
        assert group["betas"] == tuple(cfg.betas)
    (w * w).sum().backward()
    opt.step()
    assert torch.isfinite(w).all() and not torch.equal(w.detach(), torch.ones(2, 2))


def test_build_unknown_name_lists_the_allowed():
    cfg = OmegaConf.create({"name": "adagrad"})
    with pytest.raises(KeyError, match="adamw, lamb, lars, muon, sgdm"):
        build_optimizer([torch.ones(1, requires_grad=True)], cfg, lr=0.1, weight_decay=0.0)


def test_per_worker_flag_reaches_layerwise_optimizers():
    cfg = _cfg("lamb")
    opt = build_optimizer([torch.ones(K, 2, 2, requires_grad=True)], cfg, 0.1, 0.0, per_worker=True)
    assert opt.per_worker


# ----------------------------------------------------------------------------- state round trip


def train(params, opt, batches):
    """Steps of ``opt`` on a two-tensor tanh model: what the state_dict round trips continue."""
    for x in batches:
        opt.zero_grad()
        (torch.tanh(x @ params[0] + params[1]) ** 2).sum().backward()
        opt.step()


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_state_dict_round_trip_continues_identically(name):
    cfg = _cfg(name)
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(5, 3, generator=gen) for _ in range(6)]

    def make(params):
        return build_optimizer(params, cfg, lr=0.05, weight_decay=0.01)

    params = [torch.randn(3, 2, generator=gen).requires_grad_(), torch.randn(2, generator=gen).requires_grad_()]
    opt = make(params)
    train(params, opt, xs[:3])
    buf = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "opt": opt.state_dict()}, buf)
    train(params, opt, xs[3:])

    buf.seek(0)
    saved = torch.load(buf)
    resumed = [p.clone().requires_grad_() for p in saved["params"]]
    opt2 = make(resumed)
    opt2.load_state_dict(saved["opt"])
    train(resumed, opt2, xs[3:])
    for a, b in zip(params, resumed):
        assert torch.equal(a.detach(), b.detach())


# ----------------------------------------------------------------------------- Muon


def test_stacked_muon_is_torch_muon_on_each_workers_matrix_and_adamw_on_the_rest():
    """Two steps with momentum: every worker's [out, in] slice steps as torch.optim.Muon steps that
    matrix alone; the bias as torch.optim.AdamW does (same lr, betas, eps, decay)."""
    gen = torch.Generator().manual_seed(0)
    K, lr, wd = 3, 0.02, 0.01
    weight = torch.randn(K, 5, 4, generator=gen).requires_grad_(True)
    bias = torch.randn(K, 5, generator=gen).requires_grad_(True)
    grads = [(torch.randn(K, 5, 4, generator=gen), torch.randn(K, 5, generator=gen)) for _ in range(2)]
    stacked = Muon([weight, bias], lr=lr, weight_decay=wd, momentum=0.95, nesterov=True, ns_steps=5,
                   adjust_lr_fn=None, betas=(0.9, 0.99), eps=1e-8, per_worker=True)
    alone = [torch.nn.Parameter(weight[k].detach().clone()) for k in range(K)]
    muons = [torch.optim.Muon([w], lr=lr, weight_decay=wd, momentum=0.95, nesterov=True, ns_steps=5) for w in alone]
    b = torch.nn.Parameter(bias.detach().clone())
    adamw = torch.optim.AdamW([b], lr=lr, betas=(0.9, 0.99), eps=1e-8, weight_decay=wd)
    for gw, gb in grads:
        weight.grad, bias.grad = gw.clone(), gb.clone()
        stacked.step()
        for k in range(K):
            alone[k].grad = gw[k].clone()
            muons[k].step()
        b.grad = gb.clone()
        adamw.step()
    for k in range(K):
        torch.testing.assert_close(weight[k].detach(), alone[k].detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(bias.detach(), b.detach(), rtol=0, atol=1e-7)
    assert [g["muon"] for g in stacked.param_groups] == [True, False]


def test_muon_as_diloco_inner_optimizer_trains_and_resumes_exactly(make_cfg, tmp_path, monkeypatch):
    from tests.resume import assert_resume_is_exact

    assert_resume_is_exact(make_cfg, ["method=diloco", "optimizer=muon", "K=2", "H=4", "checkpoint_every=1"],
                           tmp_path, monkeypatch, stop_at=6)


# ----------------------------------------------------------------------------- gradient clipping (every optimizer)


def _worker_norms(grads):
    """Each worker's 2-norm over all of its gradient slices, in plain arithmetic."""
    return torch.stack([g.reshape(g.shape[0], -1).square().sum(1) for g in grads]).sum(0).sqrt()


def _stacked_grads(seed=7, scales=(0.1, 1.0, 5.0, 20.0)):
    """K = 4 workers' gradients of SHAPES, worker k's scaled by ``scales[k]`` (norms from small to large)."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.tensor(scales, dtype=D)
    return [torch.randn((len(scales), *shape), generator=gen, dtype=D) * s.reshape(-1, *[1] * len(shape))
            for shape in SHAPES]


def test_clip_leaves_each_worker_at_min_of_its_norm_and_c_in_its_own_direction():
    grads = _stacked_grads()
    before = [g.clone() for g in grads]
    norms = _worker_norms(before)
    c = float(norms.sort().values[1:3].mean())  # two workers under the threshold, two over it
    returned = GradClip(c)(grads)
    torch.testing.assert_close(returned, norms, rtol=1e-12, atol=0)  # the norms before the clip
    after = _worker_norms(grads)
    torch.testing.assert_close(after, torch.clamp(norms, max=c), rtol=1e-6, atol=0)  # min(||g||, c), to eps
    for k in range(4):
        if norms[k] <= c:  # multiplied by exactly 1
            assert all(torch.equal(a[k], b[k]) for a, b in zip(grads, before))
        else:  # the same direction, scaled by c / (||g|| + eps): a norm at most c
            assert after[k] <= c * (1 + 1e-12)
            for a, b in zip(grads, before):
                torch.testing.assert_close(a[k], b[k] * (c / (norms[k] + 1e-6)), rtol=1e-12, atol=0)


def test_clip_per_worker_is_torch_clip_grad_norm_on_each_workers_slices_alone():
    grads = _stacked_grads(seed=8)
    c = float(_worker_norms(grads).sort().values[1:3].mean())
    alone = []
    for k in range(4):  # worker k as one model: torch's clip over its own parameters
        params = [torch.zeros_like(g[k], requires_grad=True) for g in grads]
        for p, g in zip(params, grads):
            p.grad = g[k].clone()
        torch.nn.utils.clip_grad_norm_(params, c, foreach=False)
        alone.append([p.grad for p in params])
    GradClip(c)(grads)
    for i, g in enumerate(grads):
        torch.testing.assert_close(g, torch.stack([alone[k][i] for k in range(4)]), rtol=1e-15, atol=0)


def test_workers_clip_independently():
    grads, other = _stacked_grads(), _stacked_grads()
    for g in other:
        g[0].mul_(100.0)  # worker 0's gradient alone changes (and is clipped far harder)
    c = 2.0
    GradClip(c)(grads)
    GradClip(c)(other)
    for a, b in zip(grads, other):
        assert torch.equal(a[1:], b[1:])
    # one model (no worker dimension): one norm over everything, as clip_grad_norm_
    flat = [g[3].clone() for g in _stacked_grads()]
    GradClip(c)(flat, per_worker=False)
    assert float(_worker_norms([g.unsqueeze(0) for g in flat])[0]) == pytest.approx(c, rel=1e-6)


def test_clip_without_eps_is_the_clip_lars_and_lamb_had():
    # eps 0: c / ||g|| over the threshold (the study's LAMB: where(||g|| > c, c / ||g||, 1)), exactly 1 under it
    grads = _stacked_grads()
    norms = _worker_norms(grads)
    want = [g * torch.where(norms > 2.0, 2.0 / norms, torch.ones_like(norms)).reshape(-1, *[1] * (g.ndim - 1))
            for g in grads]
    GradClip(2.0, eps=0.0)(grads)
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b, rtol=1e-15, atol=0)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_has_the_clip_and_decay_keys(name):
    cfg = _cfg(name)
    assert cfg.grad_clip_norm is None and grad_clip(cfg) is None  # no clip by default
    assert cfg.decay_params == "auto"
    # LARS and LAMB keep the clip they had (no eps, the study's LAMB); the others, torch's clip_grad_norm_
    assert cfg.grad_clip_eps == (0.0 if name in ("lars", "lamb") else 1e-6)
    assert grad_clip(OmegaConf.merge(cfg, {"grad_clip_norm": 1.0})) == GradClip(1.0, cfg.grad_clip_eps)


def test_bad_clip_and_decay_values_are_one_clear_error():
    from dpl.config.store import to_schema

    with pytest.raises(ConfigError, match=r"^optimizer.grad_clip_norm=0.0 is invalid: allowed a number > 0"):
        to_schema(compose_cfg("optimizer=adamw", "optimizer.grad_clip_norm=0"))
    with pytest.raises(ConfigError, match=r"^optimizer.grad_clip_eps=-1.0 is invalid"):
        to_schema(compose_cfg("optimizer.grad_clip_eps=-1"))
    with pytest.raises(ConfigError, match=r"^optimizer.decay_params='norms' is invalid: allowed one of auto, all, "
                                          r"matrices$"):
        to_schema(compose_cfg("optimizer=lamb", "optimizer.decay_params=norms"))


# ----------------------------------------------------------------------------- weight-decay groups

# gpt_tiny's parameters (2 blocks): what optimizer.decay_params=matrices decays, and what not
GPT_DECAYED = {f"blocks.{i}.{m}.weight" for i in range(2) for m in ("qkv", "proj", "mlp.0", "mlp.2")}
GPT_UNDECAYED = ({"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"}  # wte: the tied output layer too
                 | {f"blocks.{i}.{n}" for i in range(2) for n in ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias",
                                                                  "qkv.bias", "proj.bias", "mlp.0.bias", "mlp.2.bias")})


def _gpt(**sizes):
    from dpl.components.models.gpt import GPT

    torch.manual_seed(0)
    return GPT(**sizes)


def test_matrices_decay_the_gpts_weight_matrices_only():
    model = _gpt()
    flags = dict(zip((n for n, _ in model.named_parameters()), decays(model, "matrices")))
    assert {n for n, d in flags.items() if d} == GPT_DECAYED
    assert {n for n, d in flags.items() if not d} == GPT_UNDECAYED
    assert all(decays(model, "all"))


def test_auto_is_the_models_registered_default():
    from dpl.components.models import MODELS
    from dpl.run.build import decay_params

    assert {n: o.facts.decay for n, o in MODELS.items()} == {
        "lenet5": "all", "resnet20": "all", "gpt": "matrices", "gpt_tiny": "matrices", "gpt_small": "matrices"}
    assert decay_params(compose_cfg()) == "all"  # lenet5: every image result as before
    assert decay_params(compose_cfg("model=resnet20")) == "all"
    assert decay_params(compose_cfg("model=gpt_tiny", "dataset=text")) == "matrices"
    assert decay_params(compose_cfg("model=gpt_tiny", "dataset=text", "optimizer.decay_params=all")) == "all"
    assert decay_params(compose_cfg("optimizer.decay_params=matrices")) == "matrices"


def test_groups_leave_a_run_where_everything_decays_as_it_was():
    w, b = torch.ones(K, 2, 2), torch.ones(K, 2)
    assert param_groups([w, b], [True, True]) == [w, b]  # one group: the optimizer state_dict of before
    groups = param_groups([w, b], [True, False])
    assert [g["params"] for g in groups] == [[w], [b]] and "weight_decay" not in groups[0]
    assert groups[1]["weight_decay"] == 0.0
    assert [g["params"] for g in param_groups([b], [False])] == [[b]]  # no empty group


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_a_parameter_without_decay_is_not_decayed(name):
    """One step at lr > 0 with zero gradients: only decay can move a parameter, and it moves the
    decayed matrices only (stacked [K, ...]: a stacked bias is 2-D, an embedding 3-D, and neither decays)."""
    model = _gpt(num_classes=16, image_size=8, n_layer=1, n_head=2, n_embd=8, block_size=8)
    stacked = [p.detach().unsqueeze(0).repeat(K, *[1] * p.dim()).requires_grad_() for p in model.parameters()]
    flags = decays(model, "matrices")
    opt = build_optimizer(param_groups(stacked, flags), _cfg(name), lr=0.1, weight_decay=0.5, per_worker=True)
    before = [p.detach().clone() for p in stacked]
    for p in stacked:
        p.grad = torch.zeros_like(p)
    opt.step()
    for (n, _), p, b, d in zip(model.named_parameters(), stacked, before, flags):
        if d:
            assert torch.linalg.vector_norm(p.detach()) < torch.linalg.vector_norm(b), n
        else:
            assert torch.equal(p.detach(), b), n


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_state_dict_round_trip_with_decay_groups(name):
    gen = torch.Generator().manual_seed(2)
    xs = [torch.randn(5, 3, generator=gen) for _ in range(6)]

    def make(params):
        return build_optimizer(param_groups(params, [True, False]), _cfg(name), lr=0.05, weight_decay=0.1)

    params = [torch.randn(3, 2, generator=gen).requires_grad_(), torch.randn(2, generator=gen).requires_grad_()]
    opt = make(params)
    train(params, opt, xs[:3])
    saved = copy.deepcopy(({"params": [p.detach().clone() for p in params], "opt": opt.state_dict()}))
    assert [g["weight_decay"] for g in saved["opt"]["param_groups"]][-1] == 0.0
    train(params, opt, xs[3:])
    resumed = [p.clone().requires_grad_() for p in saved["params"]]
    opt2 = make(resumed)
    opt2.load_state_dict(saved["opt"])
    train(resumed, opt2, xs[3:])
    for a, b in zip(params, resumed):
        assert torch.equal(a.detach(), b.detach())


def _text_corpus(where: Path) -> Path:
    where.mkdir()
    gen = torch.Generator().manual_seed(0)
    words = [b"the", b"workers", b"average", b"their", b"models", b"every", b"steps", b"of", b"a", b"byte"]
    for f in range(3):
        picks = torch.randint(len(words), (1500,), generator=gen).tolist()
        (where / f"part{f}").write_bytes(b" ".join(words[i] for i in picks))
    return where


def test_the_trainer_gives_a_gpt_decay_groups_and_lenet_one_group(tmp_path):
    from dpl.run.build import build_trainer

    cfg = compose_cfg("dataset=text", f"dataset.path={_text_corpus(tmp_path / 'text')}", "dataset.block_size=32",
                      "model=gpt_tiny", "batch_size=8", "optimizer=adamw", "K=2", "epochs=1")
    t = build_trainer(cfg, torch.device("cpu"))
    name = {id(p): n for n, p in zip(t.workers.param_names, t.workers.params)}
    decayed, undecayed = t.optimizer.param_groups
    assert {name[id(p)] for p in decayed["params"]} == GPT_DECAYED
    assert {name[id(p)] for p in undecayed["params"]} == GPT_UNDECAYED
    assert decayed["weight_decay"] == cfg.weight_decay > 0 and undecayed["weight_decay"] == 0.0
    assert all(g["lr"] is t.schedule.now for g in t.optimizer.param_groups)  # the lr schedule reaches both
    lenet = build_trainer(compose_cfg("K=2"), torch.device("cpu"))
    (group,) = lenet.optimizer.param_groups
    assert group["params"] == lenet.workers.params and group["weight_decay"] == lenet.cfg.weight_decay
