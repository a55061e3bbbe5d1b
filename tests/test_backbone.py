"""The timm backbone: channels and strides from feature_info, freezing, local weights, refusals, normalisation,
the split at layer4, the weights digest, the model package's layering, PFENet's backbone and `weights_source`."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from jc2a.model.backbone import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TESTED_BACKBONES,
    Backbone,
    create_backbone,
    feature_size,
    normalization,
    weights_source,
)

REPO = Path(__file__).resolve().parents[1]


def test_resnet18_four_stages_at_stride_8():
    bb = create_backbone("resnet18", pretrained=False)
    assert bb.channels == [64, 128, 256, 512]  # from feature_info, not hard-coded
    assert bb.reductions == [4, 8, 8, 8]
    feats = bb(torch.randn(1, 3, 129, 129))
    assert [tuple(f.shape) for f in feats] == [(1, 64, 33, 33), (1, 128, 17, 17), (1, 256, 17, 17), (1, 512, 17, 17)]
    assert feature_size(129) == 17 and feature_size(473) == 60 and feature_size(641) == 81


@pytest.mark.parametrize("name", ["regnetx_002", "efficientnet_b0"])
def test_non_resnet_cnn_works(name):
    bb = create_backbone(name, pretrained=False)
    expected = timm.create_model(name, features_only=True, out_indices=(1, 2, 3, 4)).feature_info.channels()
    assert bb.channels == expected
    feats = bb(torch.randn(1, 3, 65, 65))
    assert [f.shape[-1] for f in feats] == [17, 9, 9, 9]


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "ghostnet_100", "densenet121", "not_a_model_xyz"])
def test_unusable_backbone_refused_naming_it(name):
    with pytest.raises(ValueError, match=name):
        create_backbone(name, pretrained=False)


def test_frozen_by_default_stays_in_eval():
    bb = create_backbone("resnet18", pretrained=False)
    assert not any(p.requires_grad for p in bb.parameters())
    bb.train()
    assert not bb.training and not any(m.training for m in bb.modules())
    x = torch.randn(2, 3, 65, 65, requires_grad=True)
    assert not bb(x)[3].requires_grad  # no graph through a frozen backbone


def test_trainable_option():
    bb = create_backbone("resnet18", pretrained=False, frozen=False)
    bb.train()
    assert bb.training and all(p.requires_grad for p in bb.parameters())
    bb(torch.randn(2, 3, 65, 65))[3].sum().backward()
    assert bb.features.conv1.weight.grad is not None


def test_missing_local_weights_names_the_path(tmp_path):
    from jc2a.runs.files import read_weights

    path = tmp_path / "nowhere" / "resnet18.pth"
    with pytest.raises(FileNotFoundError, match=str(path)):
        read_weights(path)


def local_backbone(name: str, path: Path, **kwargs) -> Backbone:
    """A backbone with a local weights file, read as the run layer reads it (the model reads no files)."""
    from jc2a.runs.files import read_weights

    tensors, source = read_weights(path)
    return create_backbone(name, state_dict=tensors, source=source, where=str(path), **kwargs)


def test_local_weights_file_is_loaded(tmp_path):
    torch.manual_seed(0)
    full = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18.pth"
    torch.save(full.state_dict(), path)
    bb = local_backbone("resnet18", path)
    reference = full.state_dict()
    loaded = bb.features.state_dict()
    assert len(loaded) > 100
    for key, value in loaded.items():
        assert torch.equal(value, reference[key]), key
    # and not what a fresh random init gives
    assert not torch.equal(loaded["conv1.weight"], create_backbone("resnet18").features.conv1.weight)


def test_normalization_from_timm_cfg():
    assert normalization("resnet50") == (IMAGENET_MEAN, IMAGENET_STD)
    assert normalization("inception_v3") == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert normalization("no_such_model") == (IMAGENET_MEAN, IMAGENET_STD)  # fallback


def test_normalization_fallback_warns(caplog):
    with caplog.at_level("WARNING", logger="jc2a.model.backbone"):
        assert normalization("no_such_model") == (IMAGENET_MEAN, IMAGENET_STD)
    assert "no_such_model" in caplog.text and "ImageNet" in caplog.text


def test_backbone_owns_its_mean_and_std():
    bb = create_backbone("resnet18")
    assert bb.mean == IMAGENET_MEAN and bb.std == IMAGENET_STD
    assert bb.pixel_mean.flatten().tolist() == pytest.approx(list(IMAGENET_MEAN))
    assert bb.pixel_std.flatten().tolist() == pytest.approx(list(IMAGENET_STD))
    assert not any("pixel_" in k for k in bb.state_dict())  # non-persistent: checkpoints do not carry them
    features = timm.create_model("resnet18", features_only=True, out_indices=(1, 2, 3, 4), output_stride=8)
    assert Backbone(features, "inception_v3").mean == (0.5, 0.5, 0.5)  # timm's cfg of the name given
    assert Backbone(features, "x", mean=(0.1, 0.2, 0.3), std=(1, 2, 4)).std == (1.0, 2.0, 4.0)


def test_normalize_uint8_images():
    bb = create_backbone("resnet18")
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3).expand(2, 3, 2, 3).contiguous()
    out = bb.normalize(x)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 2, 3)
    for c in range(3):
        expected = [(v / 255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c] for v in (0, 51, 255)]
        assert out[1, c, 1].tolist() == pytest.approx(expected, abs=1e-6)
    assert out[0, 0, 0, 0].item() == pytest.approx(-0.485 / 0.229, abs=1e-6)  # -2.1179
    bb.half()  # a half-precision backbone still normalises in fp32, with unrounded statistics
    assert bb.pixel_mean.dtype == torch.float32 and torch.equal(bb.normalize(x), out)
    with pytest.raises(ValueError, match="uint8"):
        bb.normalize(x.float())
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        bb.normalize(x[:, :2])


@pytest.mark.parametrize("name", ["resnet18", "regnetx_002"])
def test_layer4_runs_apart_from_the_first_stages(name):
    bb = create_backbone(name)
    assert bb.can_split
    x = torch.randn(2, 3, 65, 65)
    full = bb(x)
    first = bb.forward_to_layer3(x)
    assert len(first) == 3
    for a, b in zip(first, full[:3]):
        assert torch.equal(a, b)
    assert torch.equal(bb.forward_layer4(first[2]), full[3])
    masked = first[2] * (torch.rand(2, 1, 9, 9) > 0.5)  # any given layer3, e.g. PFENet's masked one
    assert not torch.allclose(bb.forward_layer4(masked), full[3])
    if name == "resnet18":
        assert torch.equal(bb.forward_layer4(masked), bb.features.layer4(masked))


def test_backbone_that_cannot_split_says_so():
    bb = create_backbone("efficientnet_b0")
    assert not bb.can_split
    with pytest.raises(ValueError, match="efficientnet_b0"):
        bb.forward_layer4(torch.randn(1, bb.channels[2], 9, 9))
    with pytest.raises(ValueError, match="efficientnet_b0"):
        bb.forward_to_layer3(torch.randn(1, 3, 65, 65))


def test_split_stages_are_frozen_too():
    bb = create_backbone("resnet18")
    x = torch.randn(1, 3, 65, 65, requires_grad=True)
    assert not bb.forward_layer4(bb.forward_to_layer3(x)[2]).requires_grad
    trainable = create_backbone("resnet18", frozen=False)
    assert trainable.forward_layer4(trainable.forward_to_layer3(x)[2]).requires_grad


def test_weights_digest_is_the_sha256_of_the_state_dict():
    torch.manual_seed(0)
    bb = create_backbone("resnet18")
    reference = hashlib.sha256()
    state = bb.state_dict()
    for name in sorted(state):
        t = state[name].contiguous()
        reference.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        reference.update(t.numpy().tobytes())
    digest = bb.weights_digest()
    assert re.fullmatch(r"[0-9a-f]{64}", digest) and digest == reference.hexdigest()
    torch.manual_seed(0)
    assert create_backbone("resnet18").weights_digest() == digest  # same weights, same digest
    torch.manual_seed(1)
    assert create_backbone("resnet18").weights_digest() != digest
    with torch.no_grad():
        bb.features.layer4[1].bn2.running_var[0] += 1e-3  # a BatchNorm statistic is part of the weights
    assert bb.weights_digest() != digest


def test_model_package_does_not_import_the_data_package():
    sources = sorted((REPO / "jc2a" / "model").glob("*.py"))
    assert len(sources) >= 8  # __init__, attention, backbone, ckmm, decoder, hpam, jc2a, prior
    for path in sources:
        assert not re.search(r"\bjc2a\.data\b|from jc2a import data|from \.\.data", path.read_text()), path
    code = (
        "import sys, jc2a.model; "
        "bad = sorted(m for m in sys.modules if m == 'jc2a.data' or m.startswith('jc2a.data.')); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]


# PFENet's own backbone (pfenet_resnet50/101): the deep stem, PFENet's dilations, weights files, weights_source.


def _dilated(features, stage):
    return [(b.conv2.dilation, b.conv2.padding, b.conv2.stride) for b in features.get_submodule(stage)]


@pytest.mark.slow  # > 10 s in CI (--durations, 2026-12-02)
def test_pfenet_resnet50_stem_dilations_and_shapes():
    bb = create_backbone("pfenet_resnet50", pretrained=False)
    f = bb.features
    stem = [f.conv1[0], f.conv1[3], f.conv1[6]]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in stem] == [
        (3, 64, (3, 3), (2, 2)), (64, 64, (3, 3), (1, 1)), (64, 128, (3, 3), (1, 1))
    ]  # fmt: skip
    assert [f.conv1[1].num_features, f.conv1[4].num_features, f.bn1.num_features] == [64, 64, 128]
    assert f.layer1[0].conv1.in_channels == 128
    down = f.layer1[0].downsample  # plain 1x1 conv + BN, no avg-pool
    assert [type(m).__name__ for m in down] == ["Conv2d", "BatchNorm2d"] and down[0].kernel_size == (1, 1)
    assert [len(f.layer1), len(f.layer2), len(f.layer3), len(f.layer4)] == [3, 4, 6, 3]
    assert _dilated(f, "layer3") == [((2, 2), (2, 2), (1, 1))] * 6  # every block, the first one too
    assert _dilated(f, "layer4") == [((4, 4), (4, 4), (1, 1))] * 3
    assert f.layer3[0].downsample[0].stride == (1, 1) and f.layer4[0].downsample[0].stride == (1, 1)
    assert _dilated(f, "layer2") == [((1, 1), (1, 1), (2, 2))] + [((1, 1), (1, 1), (1, 1))] * 3
    assert bb.channels == [256, 512, 1024, 2048] and bb.reductions == [4, 8, 8, 8]
    assert bb.mean == IMAGENET_MEAN and bb.std == IMAGENET_STD and bb.weights_source == "random init"
    x = torch.randn(1, 3, 129, 129)
    feats = bb(x)
    assert [tuple(t.shape) for t in feats] == [(1, 256, 33, 33), (1, 512, 17, 17), (1, 1024, 17, 17), (1, 2048, 17, 17)]
    # the patch matters: timm's output_stride=8 alone gives the first blocks the previous dilation
    plain = timm.create_model(
        "resnet50", stem_type="deep", stem_width=64, features_only=True, out_indices=(1, 2, 3, 4), output_stride=8
    ).eval()
    assert plain.layer3[0].conv2.dilation == (1, 1) and plain.layer4[0].conv2.dilation == (2, 2)
    with torch.no_grad():
        for m in bb.features.modules():  # timm zero-inits each block's last BN: make the 3x3 convs count
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
        feats = bb(x)
        plain.load_state_dict(bb.features.state_dict())
        unpatched = plain(x)
    assert torch.equal(unpatched[1], feats[1]) and not torch.allclose(unpatched[2], feats[2])
    assert torch.equal(bb.forward_layer4(bb.forward_to_layer3(x)[2]), feats[3])  # PFENet's prior can split it


def test_pfenet_resnet101_builds_patched():
    bb = create_backbone("pfenet_resnet101", pretrained=False)
    f = bb.features
    assert [len(f.layer1), len(f.layer2), len(f.layer3), len(f.layer4)] == [3, 4, 23, 3]
    assert [f.conv1[0].out_channels, f.conv1[3].out_channels, f.conv1[6].out_channels] == [64, 64, 128]
    assert _dilated(f, "layer3") == [((2, 2), (2, 2), (1, 1))] * 23
    assert _dilated(f, "layer4") == [((4, 4), (4, 4), (1, 1))] * 3
    assert bb.channels == [256, 512, 1024, 2048] and bb.reductions == [4, 8, 8, 8] and bb.can_split


@pytest.mark.parametrize("name, source", [("pfenet_resnet50", "resnet50_v2"), ("pfenet_resnet101", "resnet101_v2")])
def test_pfenet_hub_weights_refused_in_one_line(name, source):
    with pytest.raises(ValueError) as err:
        create_backbone(name, pretrained=True)
    msg = str(err.value)
    assert "\n" not in msg and name in msg and f"initmodel/{source}.pth" in msg
    assert "jc2a convert-weights" in msg and "model.backbone.weights=" in msg


def test_normalization_of_pfenet_backbones_is_imagenets(caplog):
    with caplog.at_level("WARNING", logger="jc2a.model.backbone"):
        assert normalization("pfenet_resnet50") == (IMAGENET_MEAN, IMAGENET_STD)
        assert normalization("pfenet_resnet101") == (IMAGENET_MEAN, IMAGENET_STD)
    assert not caplog.text  # known names: no fallback warning


def test_weights_source_strings(tmp_path):
    assert weights_source("resnet50", pretrained=True) == "timm:resnet50.a1_in1k"  # timm's default tag
    assert weights_source("resnet50.tv_in1k", pretrained=True) == "timm:resnet50.tv_in1k"
    assert weights_source("resnet101", pretrained=True) == "timm:resnet101.a1h_in1k"
    assert weights_source("resnet50", pretrained=False) == "random init"
    assert weights_source("pfenet_resnet50", pretrained=False) == "random init"
    with pytest.raises(ValueError, match=r"'resnet50\.nope'.*Invalid pretrained tag"):
        weights_source("resnet50.nope", pretrained=True)
    with pytest.raises(ValueError, match="convert-weights"):
        weights_source("pfenet_resnet101", pretrained=True)


def test_backbone_records_its_weights_source(tmp_path):
    assert create_backbone("resnet18").weights_source == "random init"
    torch.manual_seed(0)
    path = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18").state_dict(), path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert local_backbone("resnet18", path).weights_source == f"file:resnet18.pth sha256:{digest}"
    features = timm.create_model("resnet18", features_only=True, out_indices=(1, 2, 3, 4), output_stride=8)
    assert Backbone(features, "resnet18").weights_source == "unknown"  # the old signature still works
    assert Backbone(features, "resnet18", weights_source="timm:resnet18.a1_in1k").weights_source.endswith("a1_in1k")


@pytest.fixture(scope="module")
def pfenet_file(tmp_path_factory):
    """A timm-layout pfenet_resnet50 safetensors file (random weights, a classifier too) and its tensors."""
    from safetensors.torch import save_file

    torch.manual_seed(3)
    full = timm.create_model("resnet50", stem_type="deep", stem_width=64)
    with torch.no_grad():
        for m in full.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    state = {k: v.contiguous() for k, v in full.state_dict().items()}
    path = tmp_path_factory.mktemp("pfenet_weights") / "full.safetensors"
    save_file(state, str(path))
    return path, state


def test_pfenet_weights_file_is_loaded_strictly(pfenet_file, tmp_path):
    from safetensors.torch import save_file

    path, state = pfenet_file
    bb = local_backbone("pfenet_resnet50", path)
    loaded = bb.features.state_dict()
    assert len(loaded) == 330 and not any(k.startswith("fc.") for k in loaded)  # the classifier is skipped
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key
    assert _dilated(bb.features, "layer3") == [((2, 2), (2, 2), (1, 1))] * 6  # loaded into the patched network
    assert bb.weights_source.startswith("file:full.safetensors sha256:")

    missing = {k: v for k, v in state.items() if k != "layer4.2.conv3.weight"}
    save_file(missing, str(tmp_path / "missing.safetensors"))  # timm's own file loading would let it pass
    with pytest.raises(ValueError, match=r"missing\.safetensors: weights .* lack 'layer4\.2\.conv3\.weight'"):
        local_backbone("pfenet_resnet50", tmp_path / "missing.safetensors")
    # a key under a module the features have, which they do not hold (a deeper network's block): refused; a key
    # under a module features_only drops (a classifier, a head) is skipped
    extra = dict(state, **{"layer4.3.conv1.weight": torch.zeros(2), "head.fc.weight": torch.zeros(2)})
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ValueError, match=r"extra\.safetensors: unexpected key 'layer4\.3\.conv1\.weight'"):
        local_backbone("pfenet_resnet50", tmp_path / "extra.safetensors")
    bad = dict(state, **{"conv1.3.weight": torch.zeros(64, 3, 3, 3)})
    save_file(bad, str(tmp_path / "shape.safetensors"))
    with pytest.raises(ValueError, match=r"'conv1\.3\.weight' has shape \[64, 3, 3, 3\], .* needs \[64, 64, 3, 3\]"):
        local_backbone("pfenet_resnet50", tmp_path / "shape.safetensors")
    (tmp_path / "noise.bin").write_bytes(b"\x07 not weights at all")
    with pytest.raises(ValueError, match=r"noise\.bin: neither a safetensors nor a torch weights file"):
        local_backbone("pfenet_resnet50", tmp_path / "noise.bin")


def test_a_local_weights_file_missing_a_tensor_is_refused_for_every_backbone(tmp_path):
    """timm's own file loading of a features_only model is not strict (a missing tensor stays random): jc2a's is,
    for timm names as for PFENet's variants. The classifier, which features_only drops, may be in the file."""
    full = timm.create_model("resnet18").state_dict()
    del full["layer4.1.bn2.running_var"]
    torch.save(full, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"partial\.pth.*lack 'layer4\.1\.bn2\.running_var'"):
        local_backbone("resnet18", tmp_path / "partial.pth")


def test_pfenet_configs_build_their_backbone():
    from jc2a.config import load_config
    from jc2a.model.jc2a import build_model

    base = REPO / "configs/base.yaml"
    cfg = load_config([base, REPO / "configs/backbone/pfenet_resnet50.yaml"], ["model.backbone.pretrained=false"])
    assert cfg.model.backbone.name == "pfenet_resnet50" and cfg.model.backbone.weights is None
    model = build_model(cfg)
    assert model.backbone.name == "pfenet_resnet50" and model.backbone.channels == [256, 512, 1024, 2048]
    assert _dilated(model.backbone.features, "layer4") == [((4, 4), (4, 4), (1, 1))] * 3
    assert model.backbone.features.conv1[6].out_channels == 128 and model.backbone.weights_source == "random init"
    with pytest.raises(ValueError, match="convert-weights"):  # as written (pretrained, no weights): how to convert
        build_model(load_config([base, REPO / "configs/backbone/pfenet_resnet50.yaml"]))
    cfg = load_config([base, REPO / "configs/backbone/pfenet_resnet101.yaml"], ["model.backbone.pretrained=false"])
    assert cfg.model.backbone.name == "pfenet_resnet101"
    bb = create_backbone(cfg.model.backbone.name, pretrained=cfg.model.backbone.pretrained)
    assert len(bb.features.layer3) == 23
    for name in ("pfenet_resnet50", "pfenet_resnet101"):
        text = (REPO / f"configs/backbone/{name}.yaml").read_text()
        assert f"jc2a convert-weights initmodel/{name.split('_')[1]}_v2.pth initmodel/{name}.safetensors" in text
        assert f"model.backbone.weights=initmodel/{name}.safetensors" in text


def test_train_bn_moves_the_frozen_backbones_statistics():
    """PFENet's `model.train()`: the frozen backbone's BatchNorm normalises with batch statistics and moves its
    running statistics, while its weights stay frozen; the default keeps it in eval (statistics never move)."""
    x = torch.randn(2, 3, 65, 65) * 3 + 1
    for train_bn in (False, True):
        torch.manual_seed(0)
        bb = create_backbone("resnet18", train_bn=train_bn)
        before = bb.features.bn1.running_mean.clone()
        bb.train()
        assert bb.moves is train_bn and bb.features.bn1.training is train_bn
        out = bb(x)[3]
        assert not out.requires_grad and not any(p.requires_grad for p in bb.parameters())  # still frozen
        assert torch.equal(bb.features.bn1.running_mean, before) is (not train_bn)
        bb.eval()
        frozen_stats = bb.features.bn1.running_mean.clone()
        bb(x)
        assert torch.equal(bb.features.bn1.running_mean, frozen_stats)  # eval(): no movement either way


@pytest.mark.parametrize("name", TESTED_BACKBONES)
def test_every_listed_backbone_family_runs_jc2a_at_stride_8(name):
    """The README's list of backbones is this list: each builds JC2A (HPAM + CKMM) and segments a 65 px episode."""
    from jc2a.config import load_config
    from jc2a.model import build_model

    cfg = load_config(REPO / "configs/toy.yaml", [f"model.backbone.name={name}", "model.backbone.pretrained=false",
                                                  "data.image_size=65", "model.feat_dim=16"])  # fmt: skip
    model = build_model(cfg).eval()
    model.prototype_bank.sums.normal_()
    model.prototype_bank.counts.fill_(1)
    assert model.backbone.reductions == [4, 8, 8, 8]
    query = torch.randint(0, 256, (1, 3, 65, 65), dtype=torch.uint8)
    supports = torch.randint(0, 256, (1, 1, 3, 65, 65), dtype=torch.uint8)
    masks = torch.zeros(1, 1, 65, 65, dtype=torch.uint8)
    masks[..., 20:40, 20:40] = 1
    with torch.no_grad():
        logits = model(query, supports, masks)
    assert logits.shape == (1, 2, 65, 65) and torch.isfinite(logits).all()


def test_the_readme_lists_the_tested_backbones():
    text = (REPO / "README.md").read_text()
    assert ", ".join(f"`{n}`" for n in TESTED_BACKBONES) in text


def test_a_mistyped_backbone_gets_a_suggestion():
    with pytest.raises(ValueError, match=r"'resnet5O' is not a timm model \(did you mean 'resnet50'"):
        create_backbone("resnet5O")


REFUSED = [
    ("ghostnet_100", "dilation not supported"),
    ("vit_tiny_patch16_224", "TypeError"),
    ("densenet121", "TypeError"),
]


@pytest.mark.parametrize("name, why", REFUSED)
def test_families_that_cannot_dilate_are_refused_by_name_with_the_reason(name, why):
    with pytest.raises(ValueError, match=rf"'{name}' cannot be used: .*{why}.*these are tested: resnet18"):
        create_backbone(name)
