"""The timm backbone: channels and strides from feature_info, freezing, local weights, refusals, normalisation,
the split at layer4, the weights digest, and the model package's layering."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from jc2a.model.backbone import IMAGENET_MEAN, IMAGENET_STD, Backbone, create_backbone, feature_size, normalization

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


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "convnext_atto", "densenet121", "not_a_model_xyz"])
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
    path = tmp_path / "nowhere" / "resnet18.pth"
    with pytest.raises(FileNotFoundError, match=str(path)):
        create_backbone("resnet18", weights=str(path))


def test_local_weights_file_is_loaded(tmp_path):
    torch.manual_seed(0)
    full = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18.pth"
    torch.save(full.state_dict(), path)
    bb = create_backbone("resnet18", pretrained=False, weights=str(path))
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
    assert len(sources) >= 9
    for path in sources:
        assert not re.search(r"\bjc2a\.data\b|from jc2a import data|from \.\.data", path.read_text()), path
    code = (
        "import sys, jc2a.model, jc2a.model.summary; "
        "bad = sorted(m for m in sys.modules if m == 'jc2a.data' or m.startswith('jc2a.data.')); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
