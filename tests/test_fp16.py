"""fp16 mixed precision without a GPU: the default model under CPU fp16 autocast against fp32; GradScaler steps."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from jc2a.bench.eval import fill_bank_at_random
from jc2a.bench.train import _batch, channels_last_batch
from jc2a.config import load_config
from jc2a.model import build_model

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
# fp16 keeps an 11-bit significand (10 stored bits + the implicit one): round-to-nearest's relative error is at
# most u = 2^-11 ~ 4.9e-4 per rounding.
U = 2.0**-11
# Layers on the longest path to the logits: ResNet50 to layer4 (1 + 16 x 3 = 49 convs: CKMM reads the query's
# layer4), CKMM's cosine map, the reduction, HPAM's projections and attention (~5), the decoder's chain through
# its four bins and the fusion (~15). Each rounds its output to fp16 once; convolutions and matmuls accumulate
# in fp32, so the rounding of what flows between layers dominates.
LAYERS = 70
# Independent rounding errors add as a random walk: relative error ~ sqrt(L) u ~ 4.1e-3 (the worst case, all of
# them aligned, is L u ~ 3.4e-2). The tolerances below allow 3x the random-walk figure.
SAFETY = 3.0
# Gradients whose value is a small residual of large cancelling terms (measured norms 1e-4, against 1e-2..1e-1
# elsewhere): W_K reaches the output only through the softmax over the key positions (whose Jacobian removes
# the mean), pos_q only along W_Q's row sums (per position, a sum of 256 terms of random sign). Rounding the terms
# to fp16 moves such a residual by more, relative to its size: measured cosine 0.94-0.9993 here.
CANCELLING = ("hpam.w_k.", "hpam.pos_q.")


def _without_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Every dropout at p = 0: `model.dropout=0` covers the mid-level reductions; the decoder's classifier heads
    hold PFENet's fixed Dropout2d(0.1)."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
    return model


def _one_pass(model, data: dict, dtype):
    """Forward (with the maps), loss, backward, in fp32 (`dtype` None) or under CPU autocast to `dtype`; the seed
    is reset first so that P2B's random order among tied blocks (train mode) is the same in both passes."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=dtype or torch.float16, enabled=dtype is not None):
        out = model(data["query_img"], data["support_imgs"], data["support_masks"], return_maps=True)
        loss = model.loss(out, data["query_mask"])
    loss.backward()
    grads = {n: p.grad.detach().double().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, loss.detach(), grads


def _margin(logits: torch.Tensor) -> torch.Tensor:
    """The foreground-minus-background logit `z`, fp32: the 2-class softmax is sigmoid(z)."""
    return (logits[:, 1] - logits[:, 0]).detach().float()


@pytest.mark.slow
def test_fp16_forward_and_backward_of_the_default_model_match_fp32():
    """The paper's model (ResNet50 random init, frozen, 473 input, HPAM + CKMM, CKMM bank filled at random), batch
    1, 1-shot, one forward + loss + backward in fp32 and one under `torch.autocast("cpu", float16)`, same weights,
    same batch.

    Both passes run in train mode, as training runs the model: the aux logits and the full loss come out, and P2B
    breaks ties among fully covered blocks at random (the seed is reset before each pass so both draw the same
    order). Every dropout is at 0 (`model.dropout=0` and the heads' fixed Dropout2d(0.1)), so both passes are the
    same function; the frozen backbone is in eval mode in either mode, and the head has no BatchNorm, so nothing
    else differs between train and eval. Model and images are in channels_last: fp16 convolutions on this CPU (no
    AVX512-FP16) are ~10x faster so. Uses 2 threads where the machine has them (45-50 s on 2 cores).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    try:
        torch.manual_seed(0)
        cfg = load_config(None, ["model.backbone.pretrained=false", "data.image_size=473", "model.dropout=0"])
        model = _without_dropout(fill_bank_at_random(build_model(cfg))).train().to(memory_format=torch.channels_last)
        data = channels_last_batch(_batch(1, 473, 1, CPU))
        out32, loss32, grads32 = _one_pass(model, data, None)
        out16, loss16, grads16 = _one_pass(model, data, torch.float16)

        # 1. fp16 really ran, and everything it gave is finite
        assert out16.logits.dtype == torch.float16 and all(a.dtype == torch.float16 for a in out16.aux_logits)
        for t in (out16.logits, *out16.aux_logits, *out16.maps.values(), loss16):
            assert torch.isfinite(t).all()
        assert grads16.keys() == grads32.keys() and len(grads32) > 40  # the whole trainable head
        assert all(torch.isfinite(g).all() for g in grads16.values()), [n for n, g in grads16.items()
                                                                         if not torch.isfinite(g).all()]  # fmt: skip

        # 2. the foreground softmax. p = sigmoid(z) moves by at most |dz| / 4 (the sigmoid's slope is <= 1/4), and
        # z's error is ~ sqrt(L) u of its own scale (max |z|, measured 0.031 for this random-init network). The
        # tolerance is 3x that: 9.6e-5, against 1.7e-5 measured (and 3.2e-5 with the two passes drawing different
        # P2B tie orders). The 0.5 +- 0.002 softmax of a random-init network is a weak signal, so the test also
        # checks below that the tolerance is tight enough to notice CKMM's map channel going missing.
        z32, z16 = _margin(out32.logits), _margin(out16.logits)
        tol_z = SAFETY * math.sqrt(LAYERS) * U * float(z32.abs().max())
        fg_diff = float((out16.maps["foreground"] - out32.maps["foreground"]).detach().abs().max())
        assert fg_diff <= tol_z / 4, (fg_diff, tol_z / 4)
        assert float((z16 - z32).abs().max()) <= tol_z

        # 3. the loss: per pixel, CE's slope in z is at most 1, so the main term moves by at most max |dz| and the
        # aux mean by at most the largest aux head's; tolerance (1 + aux_weight) x 3 sqrt(L) u max |z| over the
        # heads (2.6e-3 here: an aux head's max |z| is 0.11), against 7e-6 measured: a bound, not an estimate
        z_max = max(float(_margin(t).abs().max()) for t in (out32.logits, *out32.aux_logits))
        tol_loss = (1 + cfg.model.aux_weight) * SAFETY * math.sqrt(LAYERS) * U * z_max
        assert abs(float(loss16) - float(loss32)) <= tol_loss, (float(loss16), float(loss32), tol_loss)

        # 4. gradients, by cosine: 1 - cos ~ e^2 / 2 for a relative error e. The whole head's: measured
        # 1 - 6.5e-6, allowed 1 - 1e-4. Per tensor: measured >= 0.99977 (e <= 3.3e-2, grown from sqrt(L) u by the
        # sums over positions in each weight gradient), allowed 0.999; the cancelling residuals (CANCELLING):
        # measured >= 0.94, allowed 0.8, i.e. pointing the same way (a lost or sign-flipped gradient gives <= 0).
        def cos(a: torch.Tensor, b: torch.Tensor) -> float:
            return float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0))

        whole = cos(torch.cat([g.flatten() for g in grads32.values()]), torch.cat([grads16[n].flatten()
                                                                                   for n in grads32]))  # fmt: skip
        assert whole >= 1 - 1e-4, whole
        for name, g32 in grads32.items():
            floor = 0.8 if name.startswith(CANCELLING) else 0.999
            assert cos(g32, grads16[name]) >= floor, (name, cos(g32, grads16[name]), floor)

        # 5. the tolerance is tight enough to notice a lost channel: the fp32 model with CKMM's map (the last
        # input channel of each bin's init_merge, MIA's concat) zeroed moves the softmax by 2.9e-4 (measured)
        def drop_p_ag(module, inputs):
            x = inputs[0].clone()
            x[:, -1] = 0
            return (x,)

        hooks = [m.register_forward_pre_hook(drop_p_ag) for m in model.decoder.init_merge]
        try:
            torch.manual_seed(1)
            with torch.no_grad():
                lost = model(data["query_img"], data["support_imgs"], data["support_masks"], return_maps=True)
        finally:
            for h in hooks:
                h.remove()
        lost_diff = float((lost.maps["foreground"] - out32.maps["foreground"].detach()).abs().max())
        assert lost_diff > 2 * tol_z / 4, (lost_diff, tol_z / 4)
    finally:
        torch.set_num_threads(threads)


def test_grad_scaler_steps_fp16_training_and_skips_an_overflowing_step():
    """A few fp16 steps with `torch.amp.GradScaler("cpu")` as a training step takes them (`model.loss(model(...),
    query_mask)`, SGD with momentum) on the toy model (resnet18 at 129, frozen: fp16 backward through the
    backbone costs ~10 s a step on this CPU), one fixed batch and the same seed each step (a fixed objective:
    the same dropout masks and P2B tie order): the loss falls, the weights move and stay finite, the scale stays
    finite and positive. Then a loss multiplied by inf: the scaler skips that step (weights and momentum unchanged)
    and halves its scale; the next step trains again."""
    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs/toy.yaml", ["model.backbone.frozen=true"])
    model = fill_bank_at_random(build_model(cfg)).train().to(memory_format=torch.channels_last)
    data = channels_last_batch(_batch(cfg.train.batch_size, cfg.data.image_size, 1, CPU))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-2, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu")

    def step(blow_up: bool = False) -> float:
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.float16):
            out = model(data["query_img"], data["support_imgs"], data["support_masks"])
            loss = model.loss(out, data["query_mask"])
        assert out.logits.dtype == torch.float16
        scaler.scale(loss * math.inf if blow_up else loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    start = [p.detach().clone() for p in params]
    losses = [step() for _ in range(8)]
    scale = scaler.get_scale()
    assert all(math.isfinite(x) for x in losses) and math.isfinite(scale) and scale > 0
    # measured 1.422 -> 1.333, falling every step
    assert losses[-1] < 0.97 * losses[0] and all(b <= a + 1e-3 for a, b in zip(losses, losses[1:])), losses
    assert all(torch.isfinite(p).all() for p in params)
    assert sum(not torch.equal(p, s) for p, s in zip(params, start)) == len(params)  # every trainable tensor moved

    weights = [p.detach().clone() for p in params]
    momenta = [opt.state[p]["momentum_buffer"].clone() for p in params]
    assert math.isfinite(step(blow_up=True))  # the loss itself was finite; its scaled gradient is not
    assert all(torch.equal(p, w) for p, w in zip(params, weights))  # the step was skipped
    assert all(torch.equal(opt.state[p]["momentum_buffer"], m) for p, m in zip(params, momenta))
    assert scaler.get_scale() == scale * 0.5  # backoff_factor

    after = step()
    assert math.isfinite(after) and after <= losses[-1] + 1e-3 and scaler.get_scale() == scale * 0.5
    assert any(not torch.equal(p, w) for p, w in zip(params, weights))
