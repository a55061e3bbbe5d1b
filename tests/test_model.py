"""The JC2A network through its public API: shapes, training step, K-shot fusion, loss, ablation configs, summary."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from jc2a.config import load_config
from jc2a.model import JC2A, JC2AMaps, JC2AOutput, build_model
from jc2a.model.ckmm import EMPTY_BANK
from jc2a.model.hpam import HPAM
from jc2a.model.jc2a import pyramid_bins, pyramid_blocks
from jc2a.runs.summary import TABLE3, explain, format_table, summarize

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


def _model(*overrides: str, seed: int = 0, fill: bool = True) -> JC2A:
    """The toy model; with `fill`, its CKMM bank holds random prototypes of four classes (an empty one refuses)."""
    torch.manual_seed(seed)
    model = build_model(load_config(TOY, overrides))
    if fill:
        _fill_bank_cheaply(model)
    return model


def _fill_bank_cheaply(model: JC2A, seed: int = 7) -> None:
    """Random layer4-like features into the bank, without running the backbone."""
    if model.prototype_bank is None:
        return
    g = torch.Generator().manual_seed(seed)
    feats = torch.rand(4, model.prototype_bank.dim, 17, 17, generator=g)
    masks = torch.randint(0, 2, (4, 17, 17), generator=g)
    model.prototype_bank.update(feats, masks, model.prototype_bank.class_ids[:4])


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
    assert cfg.model.backbone.name == "resnet50.tv_in1k" and cfg.model.mia == "concat" and cfg.model.hpam.merge == "add"
    assert cfg.train.lr == 0.025 and cfg.train.lr_batch == 4 and cfg.train.scale_lr and cfg.data.eval_resize == "resize"


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


def test_empty_bank_refuses_to_run():
    model = _model(fill=False).eval()
    assert int(model.prototype_bank.counts.sum()) == 0
    q, s, m, _ = _episode(1, 1)
    for mode in (model.eval, model.train):
        mode()
        with pytest.raises(RuntimeError) as info:
            model(q, s, m)
        assert str(info.value) == EMPTY_BANK
    off = _model("model.ckmm.enabled=false", fill=False).eval()  # without CKMM there is no bank to fill
    with torch.no_grad():
        assert off(q, s, m).shape == (1, 2, 129, 129)


def test_empty_support_mask_is_finite():
    model = _model().eval()
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
    model = _model(fill=False).eval()
    q, s, m, _ = _episode(1, 1)
    with torch.no_grad():
        feats = model.extract_bank_features(q)
        assert feats.shape == (1, 512, 17, 17)
        _fill_bank(model, seed=1)
        before = model(q, s, m)
        model.prototype_bank.reset()
        _fill_bank(model, seed=2)
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
    _fill_bank_cheaply(model)
    assert (model.hpam is not None) == (cfg.model.hpam.p2p or cfg.model.hpam.p2b)
    assert (model.prototype_bank is not None) == cfg.model.ckmm.enabled
    q, s, m, _ = _episode(1, 1)
    with torch.no_grad():
        out = model(q, s, m)
    assert out.shape == (1, 2, 129, 129) and torch.isfinite(out).all()


def test_ablation_files_are_the_registrys_rows():
    """Every file of configs/ablation/ is a row of `jc2a.paper`, and builds exactly that row's variant: a newcomer
    changes an ablation in the registry, and this test says which file disagrees."""
    from jc2a.config import flatten
    from jc2a.paper import ROWS, VARIANTS, identify

    files = {p.stem: p for p in ABLATIONS}
    named = {r.config for r in ROWS if r.config}
    assert named == set(files), (named ^ set(files))
    defaults = flatten(load_config(TOY))
    for row in ROWS:
        if row.config is None:
            continue
        assert files[row.config].read_text().startswith("# Table "), row.config
        cfg = flatten(load_config([TOY, files[row.config]]))
        assert identify(cfg, defaults) == row.variant, row.config
        expected = {**{k: defaults[k] for k in cfg if k.startswith("model.")}, **VARIANTS[row.variant].model}
        assert {k: v for k, v in cfg.items() if k.startswith("model.")} == expected, row.config
    for row in TABLE3:  # the summary's rows are the registry's Table 3
        assert load_config(TOY, row.overrides()).model == load_config([TOY, files[row.row.config]]).model


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
    assert by["p2p+p2b"].total == by["p2b"].total  # shared projections, add merge
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
    """f~_s = f_s (.) M_s at the feature size, then pooled to each bin (no background leaks into coarse bins)."""
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


def test_uint8_inputs_are_normalised_by_the_backbone():
    model = _model().eval()
    g = torch.Generator().manual_seed(4)
    q = torch.randint(0, 256, (2, 3, 129, 129), dtype=torch.uint8, generator=g)
    s = torch.randint(0, 256, (2, 2, 3, 129, 129), dtype=torch.uint8, generator=g)
    _, _, m, qm = _episode(2, 2)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)  # resnet18's timm statistics
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    with torch.no_grad():
        from_uint8 = model(q, s, m.to(torch.uint8))  # masks as uint8 too
        from_float = model((q / 255 - mean) / std, (s / 255 - mean) / std, m)  # float: taken as normalised
    torch.testing.assert_close(from_uint8, from_float, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(from_uint8, model(q.float(), s.float(), m))  # raw 0..255 floats are not normalised
    assert model.loss(from_uint8, qm.to(torch.uint8)) == model.loss(from_uint8, qm)
    with pytest.raises(ValueError, match="uint8 .* or float"):
        model(q.long(), s, m)
    bank_u8 = model.extract_bank_features(q)
    torch.testing.assert_close(bank_u8, model.extract_bank_features((q / 255 - mean) / std), rtol=1e-5, atol=1e-5)


def _pfenet_literal(model: JC2A, query: torch.Tensor, supports: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """PFENet's `forward` (PFENet/model/PFENet.py), its prior lines copied: `[B, K, ...]` -> prior `[B, 1, h, w]`."""
    net = model.backbone.features  # a timm ResNet: layer0 is conv1, bn1, act1, maxpool
    layer0 = torch.nn.Sequential(net.conv1, net.bn1, net.act1, net.maxpool)
    cosine_eps = 1e-7
    with torch.no_grad():
        query_feat_3 = net.layer3(net.layer2(net.layer1(layer0(query))))
        query_feat_4 = net.layer4(query_feat_3)
        final_supp_list, mask_list = [], []
        for i in range(supports.shape[1]):
            mask = (masks[:, i, :, :] == 1).float().unsqueeze(1)
            mask_list.append(mask)
            supp_feat_3 = net.layer3(net.layer2(net.layer1(layer0(supports[:, i, :, :, :]))))
            mask = F.interpolate(
                mask, size=(supp_feat_3.size(2), supp_feat_3.size(3)), mode="bilinear", align_corners=True
            )
            supp_feat_4 = net.layer4(supp_feat_3 * mask)
            final_supp_list.append(supp_feat_4)
        corr_query_mask_list = []
        for i, tmp_supp_feat in enumerate(final_supp_list):
            resize_size = tmp_supp_feat.size(2)
            tmp_mask = F.interpolate(mask_list[i], size=(resize_size, resize_size), mode="bilinear", align_corners=True)
            tmp_supp_feat_4 = tmp_supp_feat * tmp_mask
            q = query_feat_4
            s = tmp_supp_feat_4
            bsize, ch_sz, sp_sz, _ = q.size()[:]
            tmp_query = q.contiguous().view(bsize, ch_sz, -1)
            tmp_query_norm = torch.norm(tmp_query, 2, 1, True)
            tmp_supp = s.contiguous().view(bsize, ch_sz, -1).contiguous().permute(0, 2, 1)
            tmp_supp_norm = torch.norm(tmp_supp, 2, 2, True)
            similarity = torch.bmm(tmp_supp, tmp_query) / (torch.bmm(tmp_supp_norm, tmp_query_norm) + cosine_eps)
            similarity = similarity.max(1)[0].view(bsize, sp_sz * sp_sz)
            similarity = (similarity - similarity.min(1)[0].unsqueeze(1)) / (
                similarity.max(1)[0].unsqueeze(1) - similarity.min(1)[0].unsqueeze(1) + cosine_eps
            )
            corr_query = similarity.view(bsize, 1, sp_sz, sp_sz)
            corr_query = F.interpolate(
                corr_query, size=(query_feat_3.size()[2], query_feat_3.size()[3]), mode="bilinear", align_corners=True
            )
            corr_query_mask_list.append(corr_query)
        return torch.cat(corr_query_mask_list, 1).mean(1).unsqueeze(1)


@pytest.mark.parametrize("shots", [1, 2])
def test_pfenet_prior_is_pfenets(shots):
    torch.manual_seed(0)
    model = build_model(load_config([TOY, REPO / "configs" / "ablation" / "table5_pfenet.yaml"])).eval()
    assert model.use_pfenet_prior and model.backbone.name == "resnet18"
    with torch.no_grad():  # timm zero-inits each block's last BN gamma: layer4 would be pointwise, masking moot
        for module in model.backbone.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
    q, s, m, _ = _episode(2, shots, seed=5)
    m[0, 0, 20:40, 70:110] = 1  # an irregular target, not aligned with the feature grid
    with torch.no_grad():
        out = model(q, s, m, return_maps=True)
    expected = _pfenet_literal(model, q, s, m)
    assert out.maps["prior"].shape == expected.shape == (2, 1, 17, 17)
    torch.testing.assert_close(out.maps["prior"], expected, rtol=1e-5, atol=1e-5)
    # what the support's layer4 would give unmasked before layer4 (the mask applied after it only) differs
    from jc2a.model.prior import pfenet_prior

    with torch.no_grad():
        q4 = model.backbone(q)[3].repeat_interleave(shots, dim=0)
        s4 = model.backbone(s.flatten(0, 1))[3]
        late = pfenet_prior(q4, s4, (m.flatten(0, 1) == 1).float().unsqueeze(1))
    assert (late.view(2, shots, 1, 17, 17).mean(1) - expected).abs().max() > 1e-2


def test_supports_layer4_runs_only_for_the_prior():
    calls: list[int] = []
    for overrides, expected in (((), [2]), (("model.pfenet_prior=true",), [2, 6])):
        model = _model(*overrides).eval()
        calls.clear()
        model.backbone.features.layer4.register_forward_hook(lambda mod, inp, out: calls.append(out.shape[0]))
        q, s, m, _ = _episode(2, 3)
        with torch.no_grad():
            model(q, s, m)
        assert calls == expected, overrides  # the query's layer4 (B = 2), and the B*K = 6 supports' for the prior


def test_prior_refused_for_a_backbone_that_cannot_run_layer4_apart():
    with pytest.raises(ValueError, match="efficientnet_b0"):
        _model("model.backbone.name=efficientnet_b0", "model.pfenet_prior=true", fill=False)
    model = _model("model.backbone.name=efficientnet_b0", "model.hpam.p2b=false").eval()  # without the prior it runs
    q, s, m, _ = _episode(1, 2)
    with torch.no_grad():
        assert model(q, s, m).shape == (1, 2, 129, 129)


@pytest.mark.parametrize("train", [False, True])
def test_return_maps(train):
    model = _model("model.pfenet_prior=true", "model.backbone.frozen=true").train(train)  # BatchNorm as the bank's
    q, s, m, _ = _episode(2, 3)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model(q, s, m, return_maps=True)
        torch.manual_seed(0)
        plain = model(q, s, m)
    assert isinstance(out, JC2AMaps) and set(out.maps) == {"ckmm", "prior", "foreground"}
    assert out.maps["ckmm"].shape == out.maps["prior"].shape == (2, 1, 17, 17)
    assert out.maps["foreground"].shape == (2, 129, 129)
    assert len(out.aux_logits) == 4
    logits = plain.logits if train else plain
    assert isinstance(plain, JC2AOutput) if train else isinstance(plain, torch.Tensor)
    torch.testing.assert_close(out.logits, logits, rtol=0, atol=0)  # the same computation
    torch.testing.assert_close(out.maps["foreground"], out.logits.softmax(dim=1)[:, 1])
    with torch.no_grad():  # Eq. 13 on the query's layer4: one map per query, whatever K
        expected = model.prototype_bank.probability_map(model.extract_bank_features(q))
    torch.testing.assert_close(out.maps["ckmm"], expected, rtol=1e-5, atol=1e-5)
    assert float(out.maps["ckmm"].amin()) == 0.0 and float(out.maps["ckmm"].amax()) == pytest.approx(1.0, abs=1e-5)
    if train:
        assert model.loss(out, _episode(2, 3)[3]) == model.loss(plain, _episode(2, 3)[3])
    off = _model("model.ckmm.enabled=false").eval()
    with torch.no_grad():
        assert set(off(q, s, m, return_maps=True).maps) == {"foreground"}
