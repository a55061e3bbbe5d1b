"""PFENet transforms: image and label stay aligned, sizes, padding, crop retries, eval canvas, seeding."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from jc2a.config import AugmentConfig
from jc2a.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_PIXEL,
    IMAGENET_STD,
    Compose,
    LongSideResize,
    PadToSquare,
    RandCrop,
    RandomGaussianBlur,
    RandomHorizontalFlip,
    RandRotate,
    RandScale,
    ToTensor,
    check_size,
    eval_transform,
    mean_pixel,
    normalization,
    train_transform,
)

SHAPE = (255, 0, 0)  # the target, painted red into the image
BACKGROUND = (0, 0, 255)  # everything else, blue


def make_pair(
    h: int = 240, w: int = 320, box: tuple[int, int, int, int] | None = None, band: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """An asymmetric L-like polygon as label 1 and, in the same place, red in a blue image; a 255 band below it."""
    y0, x0, bh, bw = box or (int(0.1 * h), int(0.2 * w), int(0.7 * h), int(0.45 * w))
    unit = np.array([[0.0, 0.0], [1.0, 0.1], [0.8, 0.45], [0.45, 0.4], [0.4, 1.0], [0.05, 0.9]])
    poly = np.round(unit * [bw, bh] + [x0, y0]).astype(np.int32)
    label = np.zeros((h, w), np.uint8)
    cv2.fillPoly(label, [poly], 1)
    image = np.empty((h, w, 3), np.uint8)
    image[:] = BACKGROUND
    image[label == 1] = SHAPE
    if band:
        top = y0 + bh + 4
        assert top + 6 <= h
        label[top : top + 6] = 255
    return image, label


def is_shape(image: np.ndarray) -> np.ndarray:
    """Pixels whose colour is nearer the shape's red than the background or the mean-pixel padding."""
    r, g, b = (image[..., i].astype(np.int32) for i in range(3))
    return (r >= 128) & (g < 128) & (b < 128)


def assert_aligned(image: np.ndarray, label: np.ndarray, min_pixels: int = 200) -> None:
    """The image is red where the label is 1 and not red where it is 0, away from edges; same centroid."""
    assert image.shape[:2] == label.shape
    assert set(np.unique(label).tolist()) <= {0, 1, 255}
    fg = label == 1
    if fg.sum() < min_pixels:
        return
    kernel = np.ones((3, 3), np.uint8)
    inside = cv2.erode(fg.astype(np.uint8), kernel).astype(bool)  # >= 1 px from the label boundary
    outside = cv2.erode((label == 0).astype(np.uint8), kernel).astype(bool)
    close = np.all(np.abs(image.astype(np.int32) - np.array(SHAPE)) <= 60, axis=-1)
    assert close[inside].mean() >= 0.95
    assert (~is_shape(image))[outside].mean() >= 0.95
    ys, xs = np.nonzero(fg)
    cy, cx = np.nonzero(is_shape(image))
    assert abs(ys.mean() - cy.mean()) <= 1.0 and abs(xs.mean() - cx.mean()) <= 1.0


def denormalize(img: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """`[3,H,W]` normalised -> `[H,W,3]` uint8."""
    x = img.numpy().transpose(1, 2, 0) * np.array(std) + np.array(mean)
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- single steps


def test_make_pair_is_aligned() -> None:
    assert_aligned(*make_pair())


@pytest.mark.parametrize("seed", range(8))
def test_rand_scale_size_and_alignment(seed: int) -> None:
    image, label = make_pair(240, 320)
    out_img, out_lbl = RandScale((0.5, 2.0))(image, label, np.random.default_rng(seed))
    h, w = out_lbl.shape
    assert out_img.shape == (h, w, 3) and out_img.dtype == np.uint8 and out_lbl.dtype == np.uint8
    assert round(240 * 0.5) <= h <= round(240 * 2.0)
    assert abs(w * 240 - h * 320) <= 320  # isotropic: aspect kept within a pixel
    assert_aligned(out_img, out_lbl)


def test_rand_scale_label_is_centre_aligned() -> None:
    """Sub-pixel: nearest sampling of the label follows the image's bilinear grid (INTER_NEAREST is ~0.5 px off)."""
    image, label = make_pair(400, 480)
    for seed in range(6):
        out_img, out_lbl = RandScale()(image, label, np.random.default_rng(seed))
        ys, xs = np.nonzero(out_lbl == 1)
        cy, cx = np.nonzero(is_shape(out_img))
        assert abs(ys.mean() - cy.mean()) <= 0.2 and abs(xs.mean() - cx.mean()) <= 0.2


def test_rand_scale_default_range() -> None:
    image, label = make_pair(200, 300)
    sizes = [RandScale()(image, label, np.random.default_rng(s))[1].shape for s in range(20)]
    assert all(180 <= h <= 220 and 270 <= w <= 330 for h, w in sizes)
    assert len(set(sizes)) > 1


@pytest.mark.parametrize("angle", [-10.0, 7.5, 30.0])
def test_rand_rotate_alignment_and_border(angle: float) -> None:
    image, label = make_pair(240, 320)
    out_img, out_lbl = RandRotate((angle, angle), p=1.0)(image, label, np.random.default_rng(0))
    assert out_img.shape == image.shape and out_lbl.shape == label.shape
    assert_aligned(out_img, out_lbl)
    if angle == 30.0:  # corners come from outside the source: label 255, image the mean pixel
        for y, x in [(0, 0), (0, 319), (239, 0), (239, 319)]:
            assert out_lbl[y, x] == 255
            assert tuple(out_img[y, x]) == IMAGENET_PIXEL


def test_rand_rotate_custom_padding_and_probability() -> None:
    image, label = make_pair()
    rotate = RandRotate((45, 45), p=1.0, padding=(1, 2, 3), ignore=254)
    out_img, out_lbl = rotate(image, label, np.random.default_rng(0))
    assert tuple(out_img[0, 0]) == (1, 2, 3) and out_lbl[0, 0] == 254
    same_img, same_lbl = RandRotate(p=0.0)(image, label, np.random.default_rng(0))
    assert np.array_equal(same_img, image) and np.array_equal(same_lbl, label)


def test_gaussian_blur_touches_only_the_image() -> None:
    image, label = make_pair()
    out_img, out_lbl = RandomGaussianBlur(p=1.0)(image, label, np.random.default_rng(0))
    assert np.array_equal(out_lbl, label)
    assert not np.array_equal(out_img, image)
    assert np.array_equal(out_img, cv2.GaussianBlur(image, (5, 5), 0))
    assert tuple(out_img[2, 2]) == BACKGROUND  # flat regions unchanged
    assert_aligned(out_img, out_lbl)
    kept_img, _ = RandomGaussianBlur(p=0.0)(image, label, np.random.default_rng(0))
    assert np.array_equal(kept_img, image)


def test_horizontal_flip_is_exact() -> None:
    image, label = make_pair()
    flip = RandomHorizontalFlip(p=1.0)
    rng = np.random.default_rng(0)
    once_img, once_lbl = flip(image, label, rng)
    assert np.array_equal(once_img, image[:, ::-1]) and np.array_equal(once_lbl, label[:, ::-1])
    twice_img, twice_lbl = flip(once_img, once_lbl, rng)
    assert np.array_equal(twice_img, image) and np.array_equal(twice_lbl, label)
    assert_aligned(once_img, once_lbl)


# --------------------------------------------------------------------------- crop


@pytest.mark.parametrize("hw", [(240, 320), (100, 300), (60, 80), (129, 129), (500, 130)])
def test_crop_size_and_alignment(hw: tuple[int, int]) -> None:
    image, label = make_pair(*hw)
    for seed in range(5):
        out_img, out_lbl = RandCrop(129)(image, label, np.random.default_rng(seed))
        assert out_img.shape == (129, 129, 3) and out_lbl.shape == (129, 129)
        assert out_img.flags.c_contiguous and out_lbl.flags.c_contiguous
        assert_aligned(out_img, out_lbl)


def test_crop_pads_split_around_the_centre() -> None:
    image, label = make_pair(60, 80, band=False)
    out_img, out_lbl = RandCrop(129)(image, label, np.random.default_rng(0))
    top, left = (129 - 60) // 2, (129 - 80) // 2  # 34, 24; the odd pixel goes after
    assert np.array_equal(out_lbl[top : top + 60, left : left + 80], label)
    assert np.array_equal(out_img[top : top + 60, left : left + 80], image)
    pad = np.ones((129, 129), bool)
    pad[top : top + 60, left : left + 80] = False
    assert np.all(out_lbl[pad] == 255)
    assert np.all(out_img[pad] == np.array(IMAGENET_PIXEL))
    assert (top, left) == (34, 24)


def _corner_target() -> tuple[np.ndarray, np.ndarray]:
    """A 40x40 target whose rows a 129 crop of 200x200 keeps in ~24% of the draws; its columns always."""
    label = np.zeros((200, 200), np.uint8)
    label[10:50, 80:120] = 1
    image = np.zeros((200, 200, 3), np.uint8)
    image[label == 1] = SHAPE
    return image, label


def test_crop_retries_keep_the_target() -> None:
    image, label = _corner_target()
    total = int((label == 1).sum())
    kept = [(RandCrop(129)(image, label, np.random.default_rng(s))[1] == 1).sum() / total for s in range(40)]
    assert min(kept) >= 0.85
    once = [(RandCrop(129, retries=0)(image, label, np.random.default_rng(s))[1] == 1).sum() / total for s in range(40)]
    assert sum(k < 0.85 for k in once) >= 10  # without retries most crops lose the target


def test_crop_takes_the_last_draw_when_keeping_is_impossible() -> None:
    label = np.ones((300, 300), np.uint8)  # a 129 crop never holds 85% of it
    image = np.zeros((300, 300, 3), np.uint8)
    out_img, out_lbl = RandCrop(129)(image, label, np.random.default_rng(0))
    assert out_img.shape == (129, 129, 3) and np.all(out_lbl == 1)


def test_crop_without_target_is_one_random_crop() -> None:
    image = np.random.default_rng(0).integers(0, 256, (200, 220, 3), dtype=np.uint8)
    label = np.zeros((200, 220), np.uint8)
    crops = [RandCrop(129)(image, label, np.random.default_rng(s))[0] for s in range(4)]
    assert all(c.shape == (129, 129, 3) for c in crops)
    assert not all(np.array_equal(crops[0], c) for c in crops[1:])
    # a single draw: the crop is the window at (y, x) from the first two integers of the rng
    rng = np.random.default_rng(3)
    y, x = int(rng.integers(0, 72, size=1)[0]), int(rng.integers(0, 92, size=1)[0])
    out, _ = RandCrop(129)(image, label, np.random.default_rng(3))
    assert np.array_equal(out, image[y : y + 129, x : x + 129])


# --------------------------------------------------------------------------- pipelines


def _augment(p: float) -> AugmentConfig:
    return AugmentConfig(rotate_p=p, blur_p=p, flip_p=p) if p != 0.5 else AugmentConfig()


@pytest.mark.parametrize("p", [0.5, 1.0])
def test_train_pipeline_keeps_alignment(p: float) -> None:
    image, label = make_pair(200, 260, box=(40, 60, 80, 70))
    t = train_transform(_augment(p), 129, IMAGENET_MEAN, IMAGENET_STD)
    for seed in range(25):
        img, lbl = t(image, label, np.random.default_rng(seed))
        assert img.dtype == torch.float32 and img.shape == (3, 129, 129)
        assert lbl.dtype == torch.int64 and lbl.shape == (129, 129)
        assert_aligned(denormalize(img), lbl.numpy().astype(np.uint8))
        assert (lbl == 1).sum() >= 0.85 * (label == 1).sum() * 0.9**2 * 0.95  # crop kept the (scaled) target


def test_train_pipeline_normalizes_with_mean_and_std() -> None:
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    image = np.full((140, 140, 3), 200, np.uint8)
    label = np.zeros((140, 140), np.uint8)
    cfg = AugmentConfig(scale=[1.0, 1.0], rotate_p=0.0, blur_p=0.0, flip_p=0.0)
    img, _ = train_transform(cfg, 129, mean, std)(image, label, np.random.default_rng(0))
    expected = (200 / 255 - np.array(mean)) / np.array(std)
    assert torch.allclose(img[:, 5, 5], torch.tensor(expected, dtype=torch.float32), atol=1e-5)


def test_train_pipeline_is_seeded() -> None:
    image, label = make_pair(200, 260, box=(40, 60, 80, 70))
    t = train_transform(AugmentConfig(), 129, IMAGENET_MEAN, IMAGENET_STD)
    a = t(image, label, np.random.default_rng(7))
    b = t(image, label, np.random.default_rng(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    others = [t(image, label, np.random.default_rng(s)) for s in (8, 9)]
    assert all(not torch.equal(a[0], o[0]) for o in others)
    with pytest.raises(TypeError, match="rng"):
        t(image, label)


@pytest.mark.parametrize("hw", [(240, 320), (320, 240), (129, 129), (50, 40), (600, 97)])
def test_eval_canvas(hw: tuple[int, int]) -> None:
    h, w = hw
    image, label = make_pair(h, w, band=False)
    img, lbl = eval_transform(129, IMAGENET_MEAN, IMAGENET_STD)(image, label)
    assert img.shape == (3, 129, 129) and img.dtype == torch.float32
    assert lbl.shape == (129, 129) and lbl.dtype == torch.int64
    valid = (lbl != 255).numpy()
    rows, cols = np.nonzero(valid)
    nh, nw = rows.max() + 1, cols.max() + 1
    assert valid[:nh, :nw].all() and valid.sum() == nh * nw  # one top-left rectangle
    assert max(nh, nw) == 129
    assert abs(nh * w - nw * h) <= max(h, w)  # aspect kept within a pixel
    assert torch.all(img[:, nh:, :] == 0) and torch.all(img[:, :, nw:] == 0)
    assert torch.all(lbl[nh:, :] == 255) and torch.all(lbl[:, nw:] == 255)
    if min(nh, nw) >= 40:
        assert_aligned(denormalize(img[:, :nh, :nw]), lbl[:nh, :nw].numpy().astype(np.uint8), min_pixels=100)


def test_eval_is_deterministic_without_rng() -> None:
    image, label = make_pair()
    t = eval_transform(129)
    a, b = t(image, label), t(image, label, np.random.default_rng(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# --------------------------------------------------------------------------- errors and helpers


MISMATCH_STEPS = [
    RandScale(),
    RandRotate(p=1.0),
    RandomGaussianBlur(p=1.0),
    RandomHorizontalFlip(p=1.0),
    RandCrop(129),
    LongSideResize(129),
    ToTensor(),
    train_transform(AugmentConfig(), 129),
    eval_transform(129),
]


@pytest.mark.parametrize("step", MISMATCH_STEPS, ids=lambda s: type(s).__name__)
def test_size_mismatch_names_both_sizes(step) -> None:
    image = np.zeros((480, 640, 3), np.uint8)
    label = np.zeros((480, 600), np.uint8)
    with pytest.raises(ValueError, match="image 480x640 but label 480x600"):
        step(image, label, np.random.default_rng(0))


def test_pad_to_square_mismatch_and_overflow() -> None:
    with pytest.raises(ValueError, match="image 48x64 but label 48x60"):
        PadToSquare(129)(torch.zeros(3, 48, 64), torch.zeros(48, 60, dtype=torch.int64))
    with pytest.raises(ValueError, match="200x64"):
        PadToSquare(129)(torch.zeros(3, 200, 64), torch.zeros(200, 64, dtype=torch.int64))


def test_check_size() -> None:
    for size in (473, 641, 129, 9):
        assert check_size(size) == size
    for size in (472, 474, 512, 1, 0, -7):
        with pytest.raises(ValueError, match="473"):
            check_size(size)
    with pytest.raises(ValueError):
        train_transform(AugmentConfig(), 512)
    with pytest.raises(ValueError):
        eval_transform(500)


def test_normalization_from_timm() -> None:
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg("resnet50")
    assert normalization("resnet50") == (tuple(cfg.mean), tuple(cfg.std))
    assert normalization("resnet50.a1_in1k") == (IMAGENET_MEAN, IMAGENET_STD)
    assert normalization("inception_v3") == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert normalization("no_such_backbone") == (IMAGENET_MEAN, IMAGENET_STD)
    assert normalization("resnet50.no_such_tag") == (IMAGENET_MEAN, IMAGENET_STD)


def test_mean_pixel() -> None:
    assert mean_pixel(IMAGENET_MEAN) == IMAGENET_PIXEL == (124, 116, 104)
    assert mean_pixel((0.5, 0.0, 1.0)) == (128, 0, 255)


def test_compose_repr_lists_steps() -> None:
    text = repr(train_transform(AugmentConfig(), 473))
    for name in ("RandScale", "RandRotate", "RandomGaussianBlur", "RandomHorizontalFlip", "RandCrop", "ToTensor"):
        assert name in text
    assert isinstance(eval_transform(473), Compose)
