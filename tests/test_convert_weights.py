"""`jc2a convert-weights`: PFENet's semseg-layout ResNet .pth -> timm-layout safetensors, bitwise, and its refusals."""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from jc2a.cli import main
from jc2a.model.backbone import create_backbone, state_shapes
from jc2a.runs.convert_weights import STEM_RENAMES, convert, to_timm_keys


# PFENet's model/resnet.py (semseg's deep-base ResNet), re-created with plain torch modules, and its dilation patch
# from model/PFENet.py: the reference the converted timm backbone must reproduce.
class SemsegBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + residual)


class SemsegResNet(nn.Module):
    def __init__(self, layers=(3, 4, 6, 3)) -> None:
        super().__init__()
        self.inplanes = 128
        self.conv1 = nn.Conv2d(3, 64, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = nn.Conv2d(64, 64, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(128)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.fc = nn.Linear(2048, 1000)

    def _make_layer(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * 4, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * 4),
            )
        layers = [SemsegBottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * 4
        layers += [SemsegBottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def pfenet_dilate(self) -> SemsegResNet:
        """PFENet.__init__'s loops, verbatim in effect."""
        for layer, d in ((self.layer3, 2), (self.layer4, 4)):
            for n, m in layer.named_modules():
                if "conv2" in n:
                    m.dilation, m.padding, m.stride = (d, d), (d, d), (1, 1)
                elif "downsample.0" in n:
                    m.stride = (1, 1)
        return self

    def layer4_out(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.maxpool(self.relu(self.bn3(self.conv3(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


@pytest.fixture(scope="module")
def semseg():
    """A PFENet ResNet50 with random weights and non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(0)
    net = SemsegResNet().pfenet_dilate()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(7)
    return net.eval()


@pytest.fixture(scope="module")
def semseg_pth(semseg, tmp_path_factory):
    path = tmp_path_factory.mktemp("pfenet") / "resnet50_v2.pth"
    torch.save(semseg.state_dict(), path)
    return path


def _state(semseg) -> OrderedDict:
    return OrderedDict((k, v.clone()) for k, v in semseg.state_dict().items())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_semseg_layout_is_pfenets(semseg):
    state = semseg.state_dict()
    assert tuple(state["conv1.weight"].shape) == (64, 3, 3, 3) and tuple(state["conv3.weight"].shape) == (128, 64, 3, 3)
    assert tuple(state["layer1.0.conv1.weight"].shape) == (64, 128, 1, 1)
    assert tuple(state["layer1.0.downsample.0.weight"].shape) == (256, 128, 1, 1)
    assert tuple(state["fc.weight"].shape) == (1000, 2048) and "bn3.running_var" in state
    renamed = to_timm_keys(state)
    assert {k: tuple(v.shape) for k, v in renamed.items() if not k.startswith("fc.")} == state_shapes("pfenet_resnet50")
    assert renamed["conv1.6.weight"] is state["conv3.weight"] and renamed["bn1.bias"] is state["bn3.bias"]
    assert renamed["layer2.3.bn1.bias"] is state["layer2.3.bn1.bias"]  # only the stem is renamed
    assert STEM_RENAMES == {
        "conv1": "conv1.0", "bn1": "conv1.1", "conv2": "conv1.3", "bn2": "conv1.4", "conv3": "conv1.6", "bn3": "bn1"
    }  # fmt: skip


def test_converted_weights_equal_the_source_bitwise(semseg, semseg_pth, tmp_path, capsys):
    out = tmp_path / "out" / "pfenet_resnet50.safetensors"
    assert main(["convert-weights", str(semseg_pth), str(out)]) == 0  # arch inferred: 6 layer3 blocks
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "pfenet_resnet50" in printed and f"model.backbone.weights={out}" in printed
    with safe_open(os.fspath(out), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert not any(k.startswith("fc.") for k in keys)  # the classifier is dropped
    assert keys == set(state_shapes("pfenet_resnet50")) and len(keys) == 330
    assert meta["arch"] == "pfenet_resnet50" and meta["source"] == "resnet50_v2.pth"
    assert meta["source_sha256"] == _sha256(semseg_pth)
    assert not list(out.parent.glob(".*tmp*"))  # written atomically: no temporary left

    from jc2a.runs.files import read_weights

    tensors, where = read_weights(out)  # as the run layer reads `model.backbone.weights`
    bb = create_backbone("pfenet_resnet50", state_dict=tensors, source=where)
    assert bb.weights_source == f"file:pfenet_resnet50.safetensors sha256:{_sha256(out)}"
    loaded = bb.features.state_dict()
    source = semseg.state_dict()
    compared = 0
    for key, value in source.items():
        if key.startswith("fc."):
            continue
        head, _, rest = key.partition(".")
        target = loaded[f"{STEM_RENAMES[head]}.{rest}" if head in STEM_RENAMES else key]
        assert target.dtype == value.dtype and torch.equal(target, value), key  # bitwise
        compared += 1
    assert compared == len(loaded) == 330

    x = torch.randn(2, 3, 65, 65)
    with torch.no_grad():
        reference = semseg.layer4_out(x)
    ours = bb(x)[3]
    assert ours.shape == reference.shape == (2, 2048, 9, 9)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)
    assert reference.abs().mean() > 0.05  # not a degenerate comparison of zeros


def test_checkpoint_with_module_prefix_and_no_num_batches_tracked(semseg, tmp_path):
    state = {f"module.{k}": v for k, v in _state(semseg).items() if not k.endswith("num_batches_tracked")}
    src = tmp_path / "train_epoch_50.pth"
    torch.save({"epoch": 50, "state_dict": state}, src)
    out = tmp_path / "w.safetensors"
    arch, path, count = convert(src, out, "pfenet_resnet50")
    assert (arch, path, count) == ("pfenet_resnet50", out, 330)
    with safe_open(os.fspath(out), framework="pt") as f:
        assert f.get_tensor("conv1.1.num_batches_tracked").item() == 0  # torch's initial value
        assert torch.equal(f.get_tensor("conv1.0.weight"), semseg.conv1.weight)


def test_resnet101_inferred_from_layer3_blocks(tmp_path):
    semseg_key = {v: k for k, v in STEM_RENAMES.items()}
    state = {}
    for key, shape in state_shapes("pfenet_resnet101").items():
        head = next((h for h in semseg_key if key.startswith(h + ".")), None)
        name = semseg_key[head] + key[len(head) :] if head else key
        state[name] = torch.zeros(shape, dtype=torch.long if key.endswith("num_batches_tracked") else torch.float32)
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    src = tmp_path / "resnet101_v2.pth"
    torch.save(state, src)
    arch, _, count = convert(src, tmp_path / "r101.safetensors")
    assert arch == "pfenet_resnet101" and count == 636
    with pytest.raises(ValueError, match=r"'layer3\.6\.conv1\.weight'.*pfenet_resnet50"):
        convert(src, tmp_path / "x.safetensors", "pfenet_resnet50")  # told the wrong arch: its first extra key


def test_wrong_number_of_layer3_blocks_refused(semseg, tmp_path):
    state = {k: v for k, v in _state(semseg).items() if not k.startswith("layer3.5.")}
    src = tmp_path / "odd.pth"
    torch.save(state, src)
    with pytest.raises(ValueError, match=r"odd\.pth: 5 layer3 blocks.*pfenet_resnet50: 6.*pfenet_resnet101: 23"):
        convert(src, tmp_path / "o.safetensors")


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jc2a convert-weights: error: ") and "\n" not in err and "Traceback" not in err
    return err


class _Payload:
    """A pickle that would create a file when unpickled: it must never be."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (os.fspath(self.marker), "w"))


def test_pickled_code_is_refused_without_running_it(tmp_path, capsys):
    marker = tmp_path / "ran"
    src = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "x": _Payload(marker)}, src)
    out = tmp_path / "evil.safetensors"
    err = _one_line_error(capsys, ["convert-weights", str(src), str(out)])
    assert str(src) in err and "not plain weights data" in err and "refused without running" in err
    assert not marker.exists() and not out.exists()


def test_missing_key_is_named(semseg, tmp_path, capsys):
    state = _state(semseg)
    del state["layer2.1.bn2.running_var"]
    src = tmp_path / "missing.pth"
    torch.save(state, src)
    out = tmp_path / "m.safetensors"
    err = _one_line_error(capsys, ["convert-weights", str(src), str(out), "--arch", "pfenet_resnet50"])
    assert f"{src}: missing key 'layer2.1.bn2.running_var'" in err and "[128]" in err
    assert not out.exists()
    state = _state(semseg)
    del state["bn3.weight"]  # a stem key: named as in the file, and as timm calls it
    torch.save(state, src)
    with pytest.raises(ValueError, match=r"missing key 'bn3\.weight' \(timm: 'bn1\.weight'\)"):
        convert(src, out)


def test_wrong_shape_names_key_and_both_shapes(semseg, tmp_path, capsys):
    state = _state(semseg)
    state["layer3.0.conv1.weight"] = torch.zeros(128, 512, 1, 1)
    src = tmp_path / "shape.pth"
    torch.save(state, src)
    err = _one_line_error(capsys, ["convert-weights", str(src), str(tmp_path / "s.safetensors")])
    assert "'layer3.0.conv1.weight' has shape [128, 512, 1, 1], pfenet_resnet50 needs [256, 512, 1, 1]" in err
    state = _state(semseg)
    state["conv2.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(state, src)
    with pytest.raises(ValueError, match=r"'conv2\.weight' \(timm: 'conv1\.3\.weight'\) has shape \[64, 3, 3, 3\]"):
        convert(src, tmp_path / "s.safetensors")


def test_unexpected_key_is_named(semseg, tmp_path):
    state = _state(semseg)
    state["layer1.0.extra.weight"] = torch.zeros(3)
    src = tmp_path / "extra.pth"
    torch.save(state, src)
    with pytest.raises(ValueError, match=r"extra\.pth: unexpected key 'layer1\.0\.extra\.weight' for pfenet_resnet50"):
        convert(src, tmp_path / "e.safetensors")


def test_unreadable_inputs_are_one_line_errors(tmp_path, capsys):
    out = str(tmp_path / "o.safetensors")
    missing = tmp_path / "nowhere.pth"
    assert f"{missing}: weights file not found" in _one_line_error(capsys, ["convert-weights", str(missing), out])
    text = tmp_path / "notes.pth"
    text.write_text("hello, not weights")
    assert f"{text}: not a torch weights file" in _one_line_error(capsys, ["convert-weights", str(text), out])
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    assert f"{empty}: not a torch weights file" in _one_line_error(capsys, ["convert-weights", str(empty), out])
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], listed)
    assert "holds a list, not a state dict" in _one_line_error(capsys, ["convert-weights", str(listed), out])
    mixed = tmp_path / "mixed.pth"
    torch.save({"conv1.weight": torch.zeros(1), "epoch": 3}, mixed)
    assert "entry 'epoch' is of type int, not a tensor" in _one_line_error(capsys, ["convert-weights", str(mixed), out])
    assert not Path(out).exists()
