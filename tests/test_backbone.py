"""The timm backbone: channels and strides from feature_info, freezing, local weights, refusals, normalisation."""

from __future__ import annotations

import pytest
import timm
import torch

from jc2a.model.backbone import IMAGENET_MEAN, IMAGENET_STD, create_backbone, feature_size, normalization


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
