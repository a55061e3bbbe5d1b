"""The JC2A network through its public API: shapes, training step, K-shot fusion, loss, ablation configs, summary."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from jc2a.config import load_config
from jc2a.model import JC2A, JC2AOutput, build_model
from jc2a.model.hpam import HPAM
from jc2a.model.jc2a import pyramid_bins, pyramid_blocks
from jc2a.model.summary import TABLE3, explain, format_table, summarize

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "configs" / "toy.yaml"
ABLATIONS = sorted((REPO / "configs" / "ablation").glob("*.yaml"))


def _episode(b: int = 2, k: int = 1, size: int = 129, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, 3, size, size, generator=g)
    s = torch.randn(b, k, 3, size, size, generator=g)
    m = torch.zeros(b, k, size, size, dtype=torch.long)
    m[..., size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
    m[..., :4, :] = 255
    qm = torch.zeros(b, size, size, dtype=torch.long)
    qm[:, size // 3 :, size // 3 :] = 1
    qm[:, -3:, :] = 255
    return q, s, m, qm


def _model(*overrides: str, seed: int = 0) -> JC2A:
    torch.manual_seed(seed)
    return build_model(load_config(TOY, overrides))


def _fill_bank(model: JC2A, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randn(4, 3, 129, 129, generator=g)
    masks = torch.randint(0, 2, (4, 129, 129), generator=g)
    assert model.update_bank(imgs, masks, model.prototype_bank.class_ids[:4]) == 4


def test_bins_scale_with_the_input():
    assert pyramid_bins([60, 30, 15, 8], 473) == [60, 30, 15, 8]
    assert pyramid_bins([60, 30, 15, 8], 129) == [17, 8, 4, 2]
    assert pyramid_bins([60, 30, 15, 8], 641) == [81, 40, 20, 11]
    assert pyramid_bins([60, 30, 15, 8], 9) == [2, 1, 1, 1]  # duplicates kept: one entry per level
    assert pyramid_blocks([60, 30, 15, 8], [60, 20, 5, 3], [4, 3, 3, 2]) == ([60, 20, 5, 3], [4, 3, 3, 2])
    ref = [60, 30, 15, 8]  # top-k is written for these bins; the share of blocks kept stays about 20%
    assert pyramid_blocks([17, 8, 4, 2], [60, 20, 5, 3], [4, 3, 3, 2], ref) == ([7, 2, 1, 1], [4, 3, 3, 2])
    assert pyramid_blocks([81, 40, 20, 11], [60, 20, 5, 3], [4, 3, 3, 2], ref) == ([118, 39, 10, 7], [4, 3, 3, 2])
    assert pyramid_blocks([2, 1, 1, 1], [60, 20, 5, 3], [4, 3, 3, 2], ref) == ([1, 1, 1, 1], [2, 1, 1, 1])
    assert pyramid_blocks([17, 8, 4, 2], [60, 20, 5, 3], [4, 3, 3, 2]) == ([25, 9, 4, 1], [4, 3, 3, 2])  # no ref


def test_builder_wires_the_config():
    model = _model()
    assert isinstance(model.hpam, HPAM) and model.hpam.bins == (17, 8, 4, 2) and model.hpam.topk == (7, 2, 1, 1)
    bank = model.prototype_bank
    assert bank.class_ids.tolist() == [c for c in range(1, 81) if c % 4 != 1]  # COCO fold 0 base classes
    assert bank.dim == model.backbone.channels[-1] == 512
    assert bank.meta == {"backbone": "resnet18", "dataset": "coco20i", "fold": 0}
    assert {"prototype_bank.sums", "prototype_bank.counts", "prototype_bank.class_ids"} <= set(model.state_dict())
    baseline = _model("model.hpam.p2p=false", "model.hpam.p2b=false", "model.ckmm.enabled=false")
    assert baseline.hpam is None and baseline.prototype_bank is None
    assert baseline.decoder.init_merge[0][0].in_channels == 2 * 64  # concat[f_q, prototype] only


@pytest.mark.parametrize("shots", [1, 5])
def test_shapes_at_129(shots):
    model = _model().eval()
    q, s, m, _ = _episode(2, shots)
    with torch.no_grad():
        out = model(q, s, m)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 2, 129, 129) and torch.isfinite(out).all()


def test_shape_at_473_once():
    model = _model("data.image_size=473", "model.feat_dim=16").eval()
    assert model.bins == [60, 30, 15, 8]
    q, s, m, _ = _episode(1, 1, size=473)
    with torch.no_grad():
        out = model(q, s, m)
    assert out.shape == (1, 2, 473, 473) and torch.isfinite(out).all()


def test_public_api_defaults_are_the_paper():
    cfg = load_config()
    assert cfg.model.backbone.name == "resnet50" and cfg.model.mia == "concat" and cfg.model.hpam.merge == "add"


def test_frozen_backbone_training_step_touches_only_the_head():
    model = _model("model.backbone.frozen=true").train()
    assert not model.backbone.training and model.decoder.training
    bn_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    weights_before = {k: v.clone() for k, v in model.backbone.named_parameters()}
    head = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(head, lr=0.1, momentum=0.9)
    q, s, m, qm = _episode(2, 1)
    out = model(q, s, m)
    assert isinstance(out, JC2AOutput) and len(out.aux_logits) == 4
    loss = model.loss(out, qm)
    loss.backward()
    opt.step()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for n, p in model.named_parameters() if not n.startswith("backbone."))
    for key, value in model.backbone.state_dict().items():  # BN running stats (and weights) did not move
        assert torch.equal(value, bn_before[key]), key
    for key, value in model.backbone.named_parameters():
        assert torch.equal(value, weights_before[key])
    assert any(k.endswith("running_mean") for k in bn_before)


def test_trainable_backbone_gets_gradients():
    model = _model().train()  # the toy config trains its backbone
    assert model.backbone.training
    stats = model.backbone.features.bn1.running_mean.clone()
    _fill_bank(model)  # the bank pass leaves BatchNorm statistics alone and the mode as it was
    assert torch.equal(model.backbone.features.bn1.running_mean, stats) and model.backbone.training
    q, s, m, qm = _episode(2, 1)
    model.loss(model(q, s, m), qm).backward()
    assert model.backbone.features.conv1.weight.grad is not None


def test_five_shot_is_the_mean_of_one_shot_softmaxes():
    model = _model().eval()
    _fill_bank(model)
    q, s, m, _ = _episode(2, 5, seed=3)
    m[:, 2] = 0  # one support with an empty mask
    with torch.no_grad():
        fused = model(q, s, m).softmax(dim=1)
        singles = torch.stack([model(q, s[:, k : k + 1], m[:, k : k + 1]).softmax(dim=1) for k in range(5)])
    assert torch.allclose(fused, singles.mean(0), rtol=0, atol=1e-6)
    spread = (singles - singles.mean(0)).abs().max()
    assert spread > 1e-4  # the shots do differ, well beyond the tolerance


def test_empty_support_mask_and_empty_bank_are_finite():
    model = _model().eval()
    assert int(model.prototype_bank.counts.sum()) == 0  # empty bank
    q, s, m, _ = _episode(2, 2)
    m[0] = 0  # no target at all
    m[1, 0] = 255  # everything ignored
    with torch.no_grad():
        out = model(q, s, m)
    assert torch.isfinite(out).all()
    prior = _model("model.pfenet_prior=true").eval()
    with torch.no_grad():
        assert torch.isfinite(prior(q, s, m)).all()


def test_bank_changes_the_prediction():
    model = _model().eval()
    q, s, m, _ = _episode(1, 1)
    with torch.no_grad():
        before = model(q, s, m)
        feats = model.extract_bank_features(q)
        assert feats.shape == (1, 512, 17, 17)
        _fill_bank(model)
        after = model(q, s, m)
    assert not torch.allclose(before, after)


def test_loss_is_main_plus_weighted_mean_aux():
    model = _model("model.aux_weight=0.4").train()
    q, s, m, qm = _episode(2, 1)
    out = model(q, s, m)
    ce = [
        F.cross_entropy(F.interpolate(a, size=qm.shape[-2:], mode="bilinear", align_corners=True), qm, ignore_index=255)
        for a in out.aux_logits
    ]
    expected = F.cross_entropy(out.logits, qm, ignore_index=255) + 0.4 * torch.stack(ce).mean()
    assert torch.allclose(model.loss(out, qm), expected, atol=1e-6)
    assert torch.allclose(model.loss(out.logits, qm), F.cross_entropy(out.logits, qm, ignore_index=255))
    assert model.loss(out, torch.full_like(qm, 255)).item() == 0.0  # all ignored: zero, not NaN


def test_k_shot_training_is_nll_of_the_log_mean():
    model = _model().train()
    q, s, m, qm = _episode(1, 3)
    torch.manual_seed(5)
    out = model(q, s, m)
    assert out.logits.shape == (1, 2, 129, 129) and out.aux_logits[1].shape == (1, 2, 8, 8)
    assert torch.allclose(out.logits.exp().sum(1), torch.ones(1, 129, 129), atol=1e-5)  # log-probabilities
    loss = model.loss(out, qm)
    main = F.nll_loss(out.logits, qm, ignore_index=255)
    assert main < loss and torch.isfinite(loss)
    loss.backward()


def test_bf16_autocast_forward_is_finite():
    model = _model().eval()
    _fill_bank(model)
    q, s, m, _ = _episode(1, 1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(q, s, m)
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize("path", ABLATIONS, ids=[p.stem for p in ABLATIONS])
def test_every_ablation_config_builds_and_runs(path):
    cfg = load_config([TOY, path])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    assert (model.hpam is not None) == (cfg.model.hpam.p2p or cfg.model.hpam.p2b)
    assert (model.prototype_bank is not None) == cfg.model.ckmm.enabled
    q, s, m, _ = _episode(1, 1)
    with torch.no_grad():
        out = model(q, s, m)
    assert out.shape == (1, 2, 129, 129) and torch.isfinite(out).all()


def test_ablation_files_cover_the_tables():
    names = {p.stem for p in ABLATIONS}
    assert {f"table3_{r.name}" for r in TABLE3} <= names
    assert {"table4_na", "table4_nla", "table4_cosine", "table4_no_pe", "table4_ours"} <= names
    assert {"table5_pfenet", "table5_pfenet_ckmm"} <= names
    assert {f"table6_{c}_{op}" for c in ("hpam", "mia") for op in ("multiply", "add", "concat")} <= names
    for p in ABLATIONS:
        assert p.read_text().startswith("# Table "), p
    for row in TABLE3:  # the summary's rows are the table3 files
        from_file = load_config([TOY, REPO / "configs" / "ablation" / f"table3_{row.name}.yaml"])
        from_row = load_config(TOY, row.overrides())
        assert from_file.model == from_row.model, row.name


def test_ablation_switches_change_the_decoder_input():
    c = 64
    widths = {
        "table3_baseline": 2 * c,
        "table3_p2p": 3 * c,
        "table3_ckmm": 2 * c + 1,
        "table3_all": 3 * c + 1,
        "table5_pfenet": 2 * c + 1,
        "table5_pfenet_ckmm": 2 * c + 2,
        "table6_hpam_concat": 4 * c + 1,
        "table6_mia_add": 3 * c,
        "table6_mia_multiply": 3 * c,
    }
    for name, width in widths.items():
        model = build_model(load_config([TOY, REPO / "configs" / "ablation" / f"{name}.yaml"]))
        assert model.decoder.init_merge[0][0].in_channels == width, name


def test_summary_counts_on_a_toy_config():
    cfg, counts = summarize([str(TOY)])
    by = {c.row.name: c for c in counts}
    nbins, c = len(cfg.model.bins), cfg.model.feat_dim
    assert by["p2p_p2b"].total == by["p2b"].total  # shared projections, add merge
    assert by["ckmm"].total - by["baseline"].total == nbins * c  # one more init_merge input channel
    assert by["p2p"].total - by["baseline"].total == 3 * c * c + nbins * c * c
    assert by["baseline"].trainable == by["baseline"].total  # the toy trains its backbone
    table = format_table(cfg, counts)
    assert "34.09" in table and "baseline" in table and len(table.splitlines()) == 2 + len(TABLE3)
    assert len(explain(cfg, counts)) >= 4


def test_state_dict_round_trip_keeps_the_bank():
    model = _model().eval()
    _fill_bank(model)
    other = _model(seed=1).eval()
    other.load_state_dict(copy.deepcopy(model.state_dict()))
    assert torch.equal(other.prototype_bank.counts, model.prototype_bank.counts)
    q, s, m, _ = _episode(1, 1)
    with torch.no_grad():
        assert torch.allclose(other(q, s, m), model(q, s, m))


def test_hpam_gets_the_support_masked_before_pooling():
    """SPEC: f~_s = f_s (.) M_s at the feature size, then pooled to each bin (no background leaks into coarse bins)."""
    model = _model().eval()
    q, s, m, _ = _episode(b=1)
    seen, supp = {}, {}
    model.down_supp.register_forward_hook(lambda mod, inp, out: supp.update(f_s=out))
    model.hpam.register_forward_pre_hook(lambda mod, args: seen.update({args[0]: args[1:]}))
    with torch.no_grad():
        model(q, s, m)
    f_s = supp["f_s"]
    mask = F.interpolate((m[:, 0] == 1).float()[:, None], size=f_s.shape[-2:], mode="bilinear", align_corners=True)
    for level, b in enumerate(model.bins):
        _, got_fs, got_mask = seen[level]
        torch.testing.assert_close(got_fs, F.adaptive_avg_pool2d(f_s * mask, b))
        torch.testing.assert_close(got_mask, F.adaptive_avg_pool2d(mask, b))
    coarse = len(model.bins) - 1  # pooling then masking would differ there
    wrong = F.adaptive_avg_pool2d(f_s, model.bins[coarse]) * F.adaptive_avg_pool2d(mask, model.bins[coarse])
    assert not torch.allclose(seen[coarse][1], wrong)
