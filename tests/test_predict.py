"""`jc2a predict` and `Predictor`: sizes and orientation kept, mask encodings, one-line errors, API equals CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from jc2a.cli import main
from jc2a.config import load_config, save_config
from jc2a.runs.files import CONFIG_FILE, MODEL_FILE, save_model_file
from jc2a.runs.predict import Predictor, read_image, read_mask

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.image_size=65", "model.feat_dim=32", "model.backbone.frozen=true", "train.tracking=none"]


def scene(h: int, w: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A textured RGB image `[h, w, 3]` with a red object off-centre, and its 0/1 mask."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 90, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), np.uint8)
    y0, x0 = h // 8, w // 8
    mask[y0 : y0 + h // 3, x0 : x0 + w // 3] = 1
    image[mask == 1] = (230, 40, 30)
    return image, mask


def save_rgb(path: Path, image: np.ndarray) -> Path:
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine far faster than two spinning threads."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny model (random init, CKMM bank filled) saved as a run folder: model.safetensors + config.yaml."""
    from jc2a.model import build_model

    cfg = load_config(ROOT / "configs/toy.yaml", SMALL)
    torch.manual_seed(0)
    model = build_model(cfg)
    generator = torch.Generator().manual_seed(0)
    model.prototype_bank.sums.copy_(torch.randn(model.prototype_bank.sums.shape, generator=generator).double())
    model.prototype_bank.counts.fill_(1)
    run = tmp_path_factory.mktemp("predict") / "run"
    save_model_file(run / MODEL_FILE, model, cfg)
    save_config(cfg, run / CONFIG_FILE)
    return run


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """Two supports with 0/255 masks, a 97x143 query and its transpose, as files."""
    d = tmp_path_factory.mktemp("inputs")
    out = {}
    for k, (h, w) in enumerate([(120, 90), (80, 110)]):
        image, mask = scene(h, w, seed=k + 1)
        out[f"s{k}"] = save_rgb(d / f"s{k}.png", image)
        out[f"m{k}"] = d / f"m{k}.png"
        cv2.imwrite(str(out[f"m{k}"]), mask * 255)
        out[f"mask{k}"] = mask
    query, _ = scene(97, 143, seed=7)
    out["q"] = save_rgb(d / "q.png", query)
    out["qt"] = save_rgb(d / "qt.png", np.ascontiguousarray(query.transpose(1, 0, 2)))
    out["dir"] = d
    return out


@pytest.fixture(scope="module")
def cli_out(run_dir, files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("predictions")
    args = ["predict", "--checkpoint", str(run_dir), "--out", str(out)]
    args += ["--support", f"{files['s0']}:{files['m0']}", "--support", f"{files['s1']}:{files['m1']}"]
    args += ["--query", str(files["q"]), "--query", str(files["qt"])]
    assert main(args) == 0
    return out


def test_cli_outputs_keep_each_querys_size(cli_out):
    for name, shape in (("q", (97, 143)), ("qt", (143, 97))):
        mask = cv2.imread(str(cli_out / f"{name}_mask.png"), cv2.IMREAD_UNCHANGED)
        prob = np.load(cli_out / f"{name}_prob.npy")
        overlay = cv2.imread(str(cli_out / f"{name}_overlay.png"))
        assert mask.shape == prob.shape == shape and overlay.shape == (*shape, 3)
        assert set(np.unique(mask)) <= {0, 255} and prob.dtype == np.float32
        assert 0.0 <= prob.min() <= prob.max() <= 1.0
        assert np.array_equal(mask == 255, prob > 0.5)


def test_pictures_use_the_evaluations_prediction_colour_and_a_colour_scale(cli_out):
    """The overlay tints the prediction in the evaluation figures' prediction colour (blue; yellow is their ground
    truth), and the probability picture is in colour with its scale beside it (wider than the query)."""
    from jc2a.runs.figures import GROUND_TRUTH, PREDICTION

    mask = cv2.imread(str(cli_out / "q_mask.png"), cv2.IMREAD_UNCHANGED) == 255
    overlay = cv2.cvtColor(cv2.imread(str(cli_out / "q_overlay.png")), cv2.COLOR_BGR2RGB).astype(int)
    if mask.any():
        tint = overlay[mask].mean(axis=0)
        assert np.linalg.norm(tint - PREDICTION) < np.linalg.norm(tint - GROUND_TRUTH)
    picture = cv2.imread(str(cli_out / "q_prob.png"))
    assert picture.shape[1] > 143 and picture.shape[2] == 3
    assert (np.ptp(picture.reshape(-1, 3), axis=1) > 30).mean() > 0.05  # coloured, not grey


def test_python_api_equals_the_cli(run_dir, files, cli_out):
    predictor = Predictor.from_checkpoint(run_dir, device="cpu")
    pil = lambda p: Image.open(p)  # noqa: E731
    results = predictor.predict(
        [pil(files["q"]), pil(files["qt"])], [pil(files["s0"]), pil(files["s1"])], [pil(files["m0"]), pil(files["m1"])]
    )
    for name, result in zip(("q", "qt"), results):
        assert result.mask.dtype == np.uint8 and set(np.unique(result.mask)) <= {0, 1}
        assert np.array_equal(result.mask * 255, cv2.imread(str(cli_out / f"{name}_mask.png"), cv2.IMREAD_UNCHANGED))
        assert np.array_equal(result["probability"], np.load(cli_out / f"{name}_prob.npy"))
    # numpy arrays, one query: the same
    single = predictor.predict(read_image(files["q"]), [read_image(files["s0"]), read_image(files["s1"])],
                               [files["mask0"], files["mask1"]])  # fmt: skip
    assert np.array_equal(single.probability, results[0].probability)


def test_mask_is_the_canvas_logits_mapped_back_to_the_query(run_dir, files):
    """The model's canvas logits, the query's region of the canvas resized bilinearly to its h x w."""
    from jc2a.data.transforms import eval_transform
    from jc2a.runs.predict import canvas_to_image

    predictor = Predictor.from_checkpoint(run_dir, device="cpu")
    query, supports = read_image(files["q"]), [read_image(files["s0"])]
    result = predictor.predict(query, supports, [files["mask0"]])
    canvas = eval_transform(65)  # PFENet's Resize: 97 x 143 -> 40 x 64 on the 65 canvas
    q, _ = canvas(query, np.zeros(query.shape[:2], np.uint8))
    s, m = canvas(supports[0], files["mask0"])
    with torch.no_grad():
        logits = predictor.model(q[None], s[None, None], m[None, None])
    expected = canvas_to_image(logits[0], (40, 64), (97, 143)).argmax(0)
    assert result.mask.shape == (97, 143) and np.array_equal(result.mask, expected.numpy())


class Pixelwise(torch.nn.Module):
    """A stand-in network whose foreground logit is each canvas pixel's red: transposing the query transposes it."""

    def forward(self, query, supports, masks, return_maps=False):
        red = query[:, 0].float() / 255.0
        return torch.stack([torch.full_like(red, 0.5), red], dim=1)


def test_a_transposed_query_gives_the_transposed_mask():
    cfg = load_config(ROOT / "configs/toy.yaml", SMALL)
    predictor = Predictor(Pixelwise(), cfg, device="cpu")
    query, truth = scene(97, 143, seed=3)
    support, support_mask = scene(60, 70, seed=4)
    upright = predictor.predict(query, [support], [support_mask])
    transposed = predictor.predict(np.ascontiguousarray(query.transpose(1, 0, 2)), [support], [support_mask])
    assert upright.mask.shape == (97, 143) and transposed.mask.shape == (143, 97)
    assert np.array_equal(transposed.mask, upright.mask.T)
    assert iou(upright.mask, truth) > 0.9  # where the object is, not flipped
    assert iou(upright.mask, truth[::-1]) < 0.2 and iou(upright.mask, truth[:, ::-1]) < 0.2


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.astype(bool) & b.astype(bool)).sum() / max((a.astype(bool) | b.astype(bool)).sum(), 1))


@pytest.mark.parametrize("hw", [(96, 128), (240, 320), (300, 400), (473, 473), (375, 500), (600, 800), (97, 601)])
def test_mask_lines_up_with_the_image_at_any_size(hw):
    """A stand-in network that is perfect on the canvas (foreground where the canvas pixel is red) gives a mask that
    lines up with the object at the query's own size, smaller or larger than the canvas, square or not. (Mapped as
    the evaluation scores, the canvas onto the longer side's square, it gave IoU 0.00 at 128x96, 0.06 at 320x240 and
    0.35 at 400x300 under PFENet's test_Resize.) Resize's canvas floors both sides to a multiple of 8, so an object
    edge may move by up to 8 canvas pixels' worth: at least 0.9 IoU for objects a third of the image wide."""
    h, w = hw
    cfg = load_config(ROOT / "configs/toy.yaml", ["data.image_size=473", "train.tracking=none"])
    query, truth = scene(h, w, seed=h + w)
    support, support_mask = scene(60, 70, seed=1)
    for resize in ("resize", "test_resize"):
        cfg.data.eval_resize = resize
        result = Predictor(Pixelwise(), cfg, device="cpu").predict(query, [support], [support_mask])
        assert result.mask.shape == (h, w) and result.probability.shape == (h, w)
        assert iou(result.mask, truth) > 0.9, (resize, iou(result.mask, truth))


def test_exif_orientation_is_ignored(tmp_path):
    image, _ = scene(97, 143, seed=5)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    Image.fromarray(image).save(path, exif=exif, quality=95)
    assert read_image(path).shape == (97, 143, 3)  # as stored, as the shards store images


def test_mask_encodings_give_identical_predictions(run_dir, files, tmp_path):
    predictor = Predictor.from_checkpoint(run_dir, device="cpu")
    mask = files["mask0"]
    cv2.imwrite(str(tmp_path / "zero_one.png"), mask)
    cv2.imwrite(str(tmp_path / "zero_255.png"), mask * 255)
    palette = Image.fromarray(mask * 15, mode="L").convert("P")  # index 15 (a VOC class) on 0
    palette.putpalette([0, 0, 0] + [128, 0, 0] * 255)
    palette.save(tmp_path / "palette.png")
    colour = np.zeros((*mask.shape, 3), np.uint8)
    colour[mask == 1] = (192, 128, 0)
    save_rgb(tmp_path / "colour.png", colour)
    assert Image.open(tmp_path / "palette.png").mode == "P"
    query, support = read_image(files["q"]), read_image(files["s0"])
    variants = [read_mask(tmp_path / f) for f in ("zero_one.png", "zero_255.png", "palette.png", "colour.png")]
    variants += [mask.astype(bool), Image.open(tmp_path / "palette.png")]
    probs = [predictor.predict(query, [support], [m]).probability for m in variants]
    assert all(np.array_equal(p, probs[0]) for p in probs[1:])
    other = np.zeros_like(mask)
    other[-20:, -20:] = 1
    assert not np.array_equal(predictor.predict(query, [support], [other]).probability, probs[0])  # it matters


def _fail(capsys, args) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jc2a predict: error:") and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("case", ["size", "empty", "unreadable image", "unreadable mask", "missing", "colon", "config"])
def test_one_line_errors_name_the_file(case, run_dir, files, tmp_path, capsys):
    support, mask, query = str(files["s0"]), str(files["m0"]), str(files["q"])
    extra = []
    if case == "size":
        mask = str(tmp_path / "small.png")
        cv2.imwrite(mask, np.full((10, 12), 255, np.uint8))
        expected = "small.png: the mask is 12x10, its image"
    elif case == "empty":
        mask = str(tmp_path / "empty.png")
        cv2.imwrite(mask, np.zeros((120, 90), np.uint8))
        expected = "empty.png: empty mask"
    elif case == "unreadable image":
        query = str(tmp_path / "bad.jpg")
        Path(query).write_text("not an image")
        expected = "bad.jpg: unreadable image"
    elif case == "unreadable mask":
        mask = str(tmp_path / "bad.png")
        Path(mask).write_bytes(b"\x89PNG broken")
        expected = "bad.png: unreadable mask"
    elif case == "missing":
        query = str(tmp_path / "nowhere.jpg")
        expected = "nowhere.jpg: image not found"
    elif case == "config":
        extra = ["--config", str(ROOT / "configs/toy.yaml"), *SMALL, "model.feat_dim=16"]
        expected = "checkpoint from an incompatible config"
    support_arg = support if case == "colon" else f"{support}:{mask}"
    expected = "expected IMG:MASK" if case == "colon" else expected
    args = ["predict", "--checkpoint", str(run_dir), "--support", support_arg, "--query", query]
    err = _fail(capsys, [*args, "--out", str(tmp_path / "out"), *extra])
    assert expected in err, err


def test_help_explains_mask_values_and_orientation(capsys):
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "255 is ignore" in text and "0/255 mask" in text and "palette" in text.lower() and "EXIF" in text


def test_import_jc2a_stays_light():
    code = "import sys, jc2a; assert 'torch' not in sys.modules; print(jc2a.Predictor.__name__)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "Predictor", proc.stderr


def test_a_trained_model_names_what_its_backbone_started_from(run_dir, tmp_path):
    """The model file records the training backbone's `weights_source`; loading it reports that, not the "random
    init" the backbone is built with before the file's tensors load; a file without the record says so."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from jc2a.runs.network import load_trained_model

    model, _ = load_trained_model(run_dir)
    assert model.backbone.weights_source == "random init"  # what the tiny model was built from, read back
    tensors = load_file(run_dir / MODEL_FILE)
    with safe_open(str(run_dir / MODEL_FILE), framework="pt") as f:
        metadata = dict(f.metadata())
    assert json.loads(metadata["backbone_weights"]) == "random init"
    other = tmp_path / "run"
    other.mkdir()
    (other / CONFIG_FILE).write_text((run_dir / CONFIG_FILE).read_text())
    recorded = {**metadata, "backbone_weights": json.dumps("file:w.safetensors sha256:ab")}
    save_file(tensors, str(other / MODEL_FILE), recorded)
    assert load_trained_model(other)[0].backbone.weights_source == "file:w.safetensors sha256:ab"
    del metadata["backbone_weights"]  # a model file written before the record existed
    save_file(tensors, str(other / MODEL_FILE), metadata)
    assert load_trained_model(other)[0].backbone.weights_source == f"in {MODEL_FILE} (origin not recorded)"
