"""CKMM: wGAP (Eq. 11), the prototype bank (Eq. 12) and its files and all-reduce, the map (Eq. 13), PFENet's prior."""

from __future__ import annotations

import json
import math
import pathlib
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from jc2a.model.ckmm import EMPTY_BANK, PrototypeBank, class_agnostic_map, weighted_gap
from jc2a.model.prior import minmax_normalize, pfenet_prior
from jc2a.runs.files import BANK_FORMAT, load_bank, save_bank

REPO = Path(__file__).resolve().parents[1]
FINGERPRINT = {"backbone": "resnet18", "weights": "ab12", "dataset": "coco20i", "fold": "0", "shards": "x"}


def _feats() -> torch.Tensor:
    return torch.arange(8, dtype=torch.float32).view(1, 2, 2, 2)  # channel 0: 0 1 / 2 3, channel 1: 4 5 / 6 7


def test_weighted_gap_matches_manual():
    feat = _feats()
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    out = weighted_gap(feat, mask, eps=0.0)
    assert torch.allclose(out, torch.tensor([[(0 + 3) / 2, (4 + 7) / 2]]))
    # PFENet's eps keeps an empty mask finite (zero prototype)
    assert torch.equal(weighted_gap(feat, torch.zeros(1, 1, 2, 2)), torch.zeros(1, 2))


def test_bank_update_manual_values_counts_and_ignore():
    bank = PrototypeBank([3, 5, 9], dim=2)
    feats = torch.cat([_feats(), _feats() * 10, _feats(), _feats(), _feats()])
    masks = torch.tensor(
        [
            [[1, 255], [0, 1]],  # class 5: 255 is not target -> positions (0,0), (1,1)
            [[0, 1], [0, 0]],  # class 5: position (0,1) of the x10 feature
            [[255, 255], [0, 0]],  # class 3: no target pixel -> skipped
            [[1, 1], [1, 1]],  # class 7: not a base class -> skipped
            [[0, 0], [1, 0]],  # class 9: position (1,0)
        ]
    )
    added = bank.update(feats, masks, torch.tensor([5, 5, 3, 7, 9]))
    assert added == 3
    assert bank.counts.tolist() == [0, 2, 1]
    expected_5 = torch.tensor([[1.5, 5.5], [10.0, 50.0]]).sum(0)  # two instances summed
    assert torch.allclose(bank.sums[1].float(), expected_5)
    protos = bank.prototypes()
    assert protos.dtype == torch.float32
    assert torch.allclose(protos[1], expected_5 / 2)
    assert torch.allclose(protos[2], torch.tensor([2.0, 6.0]))
    assert torch.equal(protos[0], torch.zeros(2))  # unseen class: zero row
    assert bank.seen.tolist() == [False, True, True]


def test_bank_mask_resized_bilinear_align_corners():
    bank = PrototypeBank([1], dim=2)
    mask = torch.zeros(1, 4, 4, dtype=torch.long)
    mask[0, 0, 0] = mask[0, 3, 3] = 1  # align_corners=True samples exactly the four corners for 4x4 -> 2x2
    bank.update(_feats(), mask, [1])
    assert torch.allclose(bank.prototypes()[0], torch.tensor([1.5, 5.5]))


def test_bank_keeps_float64_sums_under_half():
    bank = PrototypeBank([1, 2], dim=4)
    bank.sums.fill_(70000.0 + 1 / 3)  # beyond fp16's range
    bank.half()
    assert bank.sums.dtype == torch.float64 and bank.sums[0, 0].item() == 70000.0 + 1 / 3


def _bank(classes=(1, 2, 3), dim: int = 4, seed: int = 0) -> PrototypeBank:
    g = torch.Generator().manual_seed(seed)
    bank = PrototypeBank(list(classes), dim=dim)
    bank.update(torch.rand(3, dim, 5, 5, generator=g), torch.randint(0, 2, (3, 9, 9), generator=g), [1, 3, 3])
    return bank


def test_bank_save_load_round_trip_as_safetensors(tmp_path):
    bank = _bank()
    path = save_bank(bank, tmp_path / "bank.safetensors", FINGERPRINT)
    other = PrototypeBank([1, 2, 3], dim=4)
    load_bank(other, path, FINGERPRINT)
    assert torch.equal(other.sums, bank.sums) and torch.equal(other.counts, bank.counts)
    assert other.counts.tolist() == [1, 0, 2] and torch.equal(other.prototypes(), bank.prototypes())
    with safe_open(str(path), framework="pt") as f:  # the file is plain safetensors
        meta = f.metadata()
        assert sorted(f.keys()) == ["class_ids", "counts", "sums"]
        assert f.get_tensor("sums").dtype == torch.float64 and f.get_tensor("counts").dtype == torch.int64
        assert f.get_tensor("class_ids").tolist() == [1, 2, 3]
    assert meta["format"] == "jc2a-prototype-bank/2" == BANK_FORMAT and meta["dim"] == "4"
    assert json.loads(meta["fingerprint"]) == FINGERPRINT
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank.safetensors"]  # no temporary left
    fresh = PrototypeBank([1, 2, 3], dim=4)
    load_bank(fresh, path)  # no fingerprint asked: not checked
    assert torch.equal(fresh.sums, bank.sums)


def test_bank_save_replaces_atomically(tmp_path, monkeypatch):
    path = save_bank(_bank(seed=0), tmp_path / "bank.safetensors", FINGERPRINT)
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_bank(_bank(seed=1), path, FINGERPRINT)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["bank.safetensors"]
    with pytest.raises(TypeError, match="str to str"):
        save_bank(_bank(), tmp_path / "b.safetensors", {"fold": 0})


@pytest.mark.parametrize(
    "key, theirs, ours",
    [
        ("weights", "ab12", "cd34"),
        ("fold", "0", "1"),
        ("shards", "x", None),  # a key the file has and this run does not
    ],
)
def test_bank_fingerprint_mismatch_names_the_first_differing_key(tmp_path, key, theirs, ours):
    path = save_bank(_bank(), tmp_path / "bank.safetensors", FINGERPRINT)
    expected = {k: v for k, v in FINGERPRINT.items() if k != key}
    if ours is not None:
        expected[key] = ours
    bank = PrototypeBank([1, 2, 3], dim=4)
    with pytest.raises(ValueError) as info:
        load_bank(bank, path, expected)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert f"differs at {key!r}: the file has {theirs!r}, expected {ours!r}" in message
    assert "rebuild it with `jc2a bank` or delete the file" in message
    assert int(bank.counts.sum()) == 0  # nothing was read into the bank
    extra = {**FINGERPRINT, "augment": "pfenet"}  # a key this run has and the file does not
    with pytest.raises(ValueError, match="differs at 'augment': the file has None, expected 'pfenet'"):
        load_bank(bank, path, extra)


@pytest.mark.parametrize(
    "classes, dim, field",
    [([1, 2, 4], 4, r"class_ids=\[1, 2, 3\], this model needs class_ids=\[1, 2, 4\]"), ([1, 2, 3], 8, "dim=4")],
)
def test_bank_for_other_classes_or_features_refused(tmp_path, classes, dim, field):
    path = save_bank(_bank(), tmp_path / "bank.safetensors", FINGERPRINT)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: .*{field}"):
        load_bank(PrototypeBank(classes, dim=dim), path, FINGERPRINT)


class _Marker:
    """Unpickling this object creates a file: it shows whether a payload was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (self.path,))


def _bad_file(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.bank"
    good = {"class_ids": torch.tensor([1, 2, 3]), "sums": torch.zeros(3, 4, dtype=torch.float64)}
    good["counts"] = torch.zeros(3, dtype=torch.int64)
    meta = {"format": BANK_FORMAT, "dim": "4", "fingerprint": json.dumps(FINGERPRINT)}
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator()).numpy())
    elif kind == "truncated":
        save_file(good, str(path), metadata=meta)
        path.write_bytes(path.read_bytes()[:-10])
    elif kind == "no_format":
        save_file(good, str(path), metadata={"dim": "4"})
    elif kind == "old_format":
        save_file(good, str(path), metadata={**meta, "format": "jc2a-prototype-bank/1"})
    elif kind == "extra_tensor":
        save_file({**good, "more": torch.zeros(1)}, str(path), metadata=meta)
    elif kind == "float32_sums":
        save_file({**good, "sums": torch.zeros(3, 4)}, str(path), metadata=meta)
    elif kind == "wrong_shape":
        save_file({**good, "sums": torch.zeros(3, 5, dtype=torch.float64)}, str(path), metadata=meta)
    elif kind == "nan_sums":
        save_file({**good, "sums": torch.full((3, 4), float("nan"), dtype=torch.float64)}, str(path), metadata=meta)
    elif kind == "negative_counts":
        save_file({**good, "counts": torch.tensor([1, -1, 0])}, str(path), metadata=meta)
    elif kind == "no_fingerprint":
        save_file(good, str(path), metadata={"format": BANK_FORMAT, "dim": "4"})
    return path


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("directory", "is a directory"),
        ("empty", "empty file"),
        ("random", "not a safetensors prototype bank"),
        ("truncated", "not a safetensors prototype bank"),
        ("no_format", "not a prototype bank .*format='jc2a-prototype-bank/2'"),
        ("old_format", "not a prototype bank"),
        ("extra_tensor", r"tensors are \['class_ids', 'counts', 'more', 'sums'\]"),
        ("float32_sums", "sums is torch.float32, expected torch.float64"),
        ("wrong_shape", r"sums \(3, 5\) and counts \(3,\) do not fit 3 classes of dim 4"),
        ("nan_sums", "sums are not all finite"),
        ("negative_counts", "negative counts"),
        ("no_fingerprint", "no readable fingerprint"),
    ],
)
def test_bank_file_that_is_not_a_bank_refused_in_one_line(tmp_path, kind, reason):
    path = _bad_file(tmp_path, kind)
    bank = PrototypeBank([1, 2, 3], dim=4)
    with pytest.raises(ValueError) as info:
        load_bank(bank, path, FINGERPRINT)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    assert re.search(reason, message), message
    assert int(bank.counts.sum()) == 0 and not bool(bank.sums.any())


def test_pickled_bank_is_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"
    payload = {"format": "jc2a-prototype-bank/1", "class_ids": [1, 2, 3], "dim": 4, "trap": _Marker(marker)}
    path = tmp_path / "bank.pt"
    torch.save(payload, path)
    torch.load(path, weights_only=False)  # the trap is live: unpickling it creates the marker
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: not a safetensors prototype bank"):
        load_bank(PrototypeBank([1, 2, 3], dim=4), path, FINGERPRINT)
    assert not marker.exists()


def test_bank_missing_file(tmp_path):
    path = tmp_path / "missing.safetensors"
    with pytest.raises(FileNotFoundError, match=rf"^{re.escape(str(path))}: prototype bank file not found"):
        load_bank(PrototypeBank([1], dim=2), path)


def test_all_reduce_is_a_noop_without_distributed():
    bank = PrototypeBank([1], dim=2)
    bank.update(_feats(), torch.ones(1, 2, 2, dtype=torch.long), [1])
    before = bank.sums.clone()
    bank.all_reduce()
    assert torch.equal(bank.sums, before) and bank.counts.tolist() == [1]


_WORKER = textwrap.dedent(
    """
    import sys
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp
    from jc2a.model.ckmm import PrototypeBank
    from jc2a.runs.files import save_bank

    def worker(rank, port, data_path, out_path):
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        data = torch.load(data_path)
        bank = PrototypeBank(data["classes"], data["feats"].shape[1])
        for start in range(rank, len(data["feats"]), 2 * 3):  # this rank's half, in batches of 3
            idx = list(range(start, min(start + 2 * 3, len(data["feats"])), 2))
            bank.update(data["feats"][idx], data["masks"][idx], data["class_ids"][idx])
        bank.all_reduce()
        if rank == 0:
            save_bank(bank, out_path, {"ranks": "2"})
        dist.barrier()
        dist.destroy_process_group()

    if __name__ == "__main__":
        mp.spawn(worker, args=(int(sys.argv[1]), sys.argv[2], sys.argv[3]), nprocs=2)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_all_reduce_over_two_gloo_processes_equals_one_process(tmp_path):
    g = torch.Generator().manual_seed(0)
    classes = [2, 4, 6, 8]
    data = {
        "classes": classes,
        "feats": torch.rand(20, 16, 5, 5, generator=g),
        "masks": torch.randint(0, 2, (20, 17, 17), generator=g),
        "class_ids": torch.tensor([2, 4, 6, 8, 3] * 4),
    }
    data["masks"][:, :3] = 255  # ignored rows: not target
    torch.save(data, tmp_path / "data.pt")
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    out = tmp_path / "bank.safetensors"
    proc = subprocess.run(
        [sys.executable, str(script), str(_free_port()), str(tmp_path / "data.pt"), str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and out.is_file(), proc.stderr[-2000:]

    single = PrototypeBank(classes, 16)
    single.update(data["feats"], data["masks"], data["class_ids"])
    reduced = PrototypeBank(classes, 16)
    load_bank(reduced, out, {"ranks": "2"})
    assert reduced.counts.tolist() == single.counts.tolist() == [4, 4, 4, 4]
    assert torch.allclose(reduced.sums, single.sums, rtol=0, atol=1e-12)
    assert torch.allclose(reduced.prototypes(), single.prototypes(), rtol=0, atol=1e-6)


def test_probability_map_mean_vs_max():
    # two unit prototypes; query positions [1,0], [1,1], [0,1]
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    seen = torch.tensor([True, True, False])  # the third class was never seen: left out
    feat = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]]).view(1, 2, 1, 3)
    mean = class_agnostic_map(feat, protos, seen, "mean")  # cos means: 0.5, 0.707, 0.5
    best = class_agnostic_map(feat, protos, seen, "max")  # cos max: 1, 0.707, 1
    assert torch.allclose(mean.flatten(), torch.tensor([0.0, 1.0, 0.0]), atol=1e-5)
    assert torch.allclose(best.flatten(), torch.tensor([1.0, 0.0, 1.0]), atol=1e-5)
    # Eq. 13 before the normalisation: the mean of the cosines at [1, 1] is 1/sqrt(2)
    raw = torch.nn.functional.normalize(feat.flatten(2), dim=1).transpose(1, 2) @ protos[:2].t()
    assert math.isclose(raw.mean(-1)[0, 1].item(), 1 / math.sqrt(2), rel_tol=1e-6)


def test_probability_map_range_and_empty_bank():
    bank = PrototypeBank([1, 2, 3], dim=8)
    feat = torch.rand(2, 8, 6, 6)
    with pytest.raises(RuntimeError) as info:  # an empty bank would feed the decoder zeros
        bank.probability_map(feat)
    expected = (
        "CKMM is on but the prototype bank is empty: build it with `jc2a bank` (or `jc2a train`, which builds it) "
        "or set model.ckmm.bank_file"
    )
    assert str(info.value) == EMPTY_BANK == expected
    bank.update(torch.rand(4, 8, 6, 6), torch.randint(0, 2, (4, 12, 12)), [1, 2, 2, 3])
    for reduce in ("mean", "max"):
        p = bank.probability_map(feat, reduce)
        assert p.dtype == torch.float32 and p.min() >= 0 and p.max() <= 1
        lo, hi = p.flatten(1).amin(1), p.flatten(1).amax(1)
        assert torch.allclose(lo, torch.zeros(2)) and torch.allclose(hi, torch.ones(2))
    constant = bank.probability_map(torch.ones(1, 8, 3, 3))  # a constant map -> zeros, finite
    assert torch.equal(constant, torch.zeros_like(constant))


def test_minmax_constant_is_zero():
    out = minmax_normalize(torch.full((2, 1, 3, 3), 4.0))
    assert torch.isfinite(out).all() and out.abs().max() == 0


def test_pfenet_prior_matches_manual():
    g = torch.Generator().manual_seed(1)
    q = torch.rand(1, 3, 2, 2, generator=g)
    s = torch.rand(1, 3, 2, 2, generator=g)
    mask = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    prior = pfenet_prior(q, s, mask)
    masked = (s * mask).flatten(2)[0].t()  # [4, 3]
    raw = torch.zeros(4)
    for i, qv in enumerate(q.flatten(2)[0].t()):
        raw[i] = max(float(sv @ qv / (sv.norm() * qv.norm() + 1e-7)) for sv in masked)
    expected = (raw - raw.min()) / (raw.max() - raw.min() + 1e-7)
    assert torch.allclose(prior.flatten(), expected, atol=1e-6)
    # an empty support mask gives an all-zero prior, finite
    empty = pfenet_prior(q, s, torch.zeros(1, 1, 2, 2))
    assert torch.isfinite(empty).all() and empty.abs().max() == 0


def test_build_model_reads_no_files_the_runs_load_the_bank(tmp_path):
    from jc2a.config import load_config
    from jc2a.model import build_model

    bank_file = tmp_path / "bank.safetensors"
    cfg = load_config(REPO / "configs/toy.yaml", [f"model.ckmm.bank_file={bank_file}"])
    model = build_model(cfg)
    feats = torch.rand(2, model.prototype_bank.dim, 5, 5)
    masks = torch.ones(2, 5, 5, dtype=torch.uint8)
    model.prototype_bank.update(feats, masks, model.prototype_bank.class_ids[:2])
    save_bank(model.prototype_bank, bank_file, FINGERPRINT)
    again = build_model(cfg)  # `model` knows tensors, never files: bank_file is the runs' to read
    assert int(again.prototype_bank.counts.sum()) == 0
    load_bank(again.prototype_bank, bank_file, FINGERPRINT)
    assert torch.equal(again.prototype_bank.sums, model.prototype_bank.sums)
    assert again.prototype_bank.counts.tolist() == model.prototype_bank.counts.tolist()
    other_fold = build_model(load_config(REPO / "configs/toy.yaml", ["data.fold=1"]))
    with pytest.raises(ValueError, match=r"bank\.safetensors: prototype bank was built with class_ids="):
        load_bank(other_fold.prototype_bank, bank_file, FINGERPRINT)
