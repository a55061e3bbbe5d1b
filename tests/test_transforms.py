"""PFENet transforms: image and label stay aligned, sizes, padding, crop retries, eval canvas, seeding."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from timm.data import IMAGENET_DEFAULT_MEAN

from jc2a.config import AugmentConfig
from jc2a.data.transforms import (
    Compose,
    RandCrop,
    RandomGaussianBlur,
    RandomHorizontalFlip,
    RandRotate,
    RandScale,
    Resize,
    TestResize,
    ToTensor,
    canvas_size,
    check_size,
    eval_transform,
    mean_pixel,
    train_transform,
)

IMAGENET_MEAN = tuple(IMAGENET_DEFAULT_MEAN)  # the backbone's statistics: the padding colour is its mean pixel
IMAGENET_PIXEL = mean_pixel(IMAGENET_MEAN)  # (124, 116, 104)

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


def hwc(img: torch.Tensor) -> np.ndarray:
    """`[3,H,W]` uint8 tensor -> `[H,W,3]` uint8 array."""
    assert img.dtype == torch.uint8
    return img.numpy().transpose(1, 2, 0)


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
    out_img, out_lbl = RandRotate((angle, angle), p=1.0, padding=IMAGENET_PIXEL)(image, label, np.random.default_rng(0))
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
    same_img, same_lbl = RandRotate(p=0.0, padding=IMAGENET_PIXEL)(image, label, np.random.default_rng(0))
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
        out_img, out_lbl = RandCrop(129, padding=IMAGENET_PIXEL)(image, label, np.random.default_rng(seed))
        assert out_img.shape == (129, 129, 3) and out_lbl.shape == (129, 129)
        assert out_img.flags.c_contiguous and out_lbl.flags.c_contiguous
        assert_aligned(out_img, out_lbl)


def test_crop_pads_split_around_the_centre() -> None:
    image, label = make_pair(60, 80, band=False)
    out_img, out_lbl = RandCrop(129, padding=IMAGENET_PIXEL)(image, label, np.random.default_rng(0))
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
    crop, first = RandCrop(129, padding=IMAGENET_PIXEL), RandCrop(129, padding=IMAGENET_PIXEL, retries=0)
    kept = [(crop(image, label, np.random.default_rng(s))[1] == 1).sum() / total for s in range(40)]
    assert min(kept) >= 0.85
    once = [(first(image, label, np.random.default_rng(s))[1] == 1).sum() / total for s in range(40)]
    assert sum(k < 0.85 for k in once) >= 10  # without retries most crops lose the target


def test_crop_takes_the_last_draw_when_keeping_is_impossible() -> None:
    label = np.ones((300, 300), np.uint8)  # a 129 crop never holds 85% of it
    image = np.zeros((300, 300, 3), np.uint8)
    out_img, out_lbl = RandCrop(129, padding=IMAGENET_PIXEL)(image, label, np.random.default_rng(0))
    assert out_img.shape == (129, 129, 3) and np.all(out_lbl == 1)


def test_crop_without_target_is_one_random_crop() -> None:
    image = np.random.default_rng(0).integers(0, 256, (200, 220, 3), dtype=np.uint8)
    label = np.zeros((200, 220), np.uint8)
    crops = [RandCrop(129, padding=IMAGENET_PIXEL)(image, label, np.random.default_rng(s))[0] for s in range(4)]
    assert all(c.shape == (129, 129, 3) for c in crops)
    assert not all(np.array_equal(crops[0], c) for c in crops[1:])
    # a single draw: the crop is the window at (y, x) from the first two integers of the rng
    rng = np.random.default_rng(3)
    y, x = int(rng.integers(0, 72, size=1)[0]), int(rng.integers(0, 92, size=1)[0])
    out, _ = RandCrop(129, padding=IMAGENET_PIXEL)(image, label, np.random.default_rng(3))
    assert np.array_equal(out, image[y : y + 129, x : x + 129])


# --------------------------------------------------------------------------- pipelines


def _augment(p: float) -> AugmentConfig:
    return AugmentConfig(rotate_p=p, blur_p=p, flip_p=p) if p != 0.5 else AugmentConfig()


@pytest.mark.parametrize("p", [0.5, 1.0])
def test_train_pipeline_keeps_alignment(p: float) -> None:
    image, label = make_pair(200, 260, box=(40, 60, 80, 70))
    t = train_transform(_augment(p), 129, IMAGENET_MEAN)
    for seed in range(25):
        img, lbl = t(image, label, np.random.default_rng(seed))
        assert img.dtype == torch.uint8 and img.shape == (3, 129, 129)
        assert lbl.dtype == torch.uint8 and lbl.shape == (129, 129)
        assert_aligned(hwc(img), lbl.numpy())
        assert (lbl == 1).sum() >= 0.85 * (label == 1).sum() * 0.9**2 * 0.95  # crop kept the (scaled) target


def test_train_pipeline_pads_with_the_mean_pixel_and_stays_uint8() -> None:
    mean = (0.5, 0.4, 0.3)
    image = np.full((100, 100, 3), 200, np.uint8)
    label = np.zeros((100, 100), np.uint8)
    cfg = AugmentConfig(scale=[1.0, 1.0], rotate_p=0.0, blur_p=0.0, flip_p=0.0)
    img, lbl = train_transform(cfg, 129, mean)(image, label, np.random.default_rng(0))
    assert img.dtype == torch.uint8 and lbl.dtype == torch.uint8
    assert img[:, 0, 0].tolist() == list(mean_pixel(mean)) and int(lbl[0, 0]) == 255  # padding
    assert img[:, 64, 64].tolist() == [200, 200, 200] and int(lbl[64, 64]) == 0  # the image, untouched


def test_train_pipeline_is_seeded() -> None:
    image, label = make_pair(200, 260, box=(40, 60, 80, 70))
    t = train_transform(AugmentConfig(), 129, IMAGENET_MEAN)
    a = t(image, label, np.random.default_rng(7))
    b = t(image, label, np.random.default_rng(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    others = [t(image, label, np.random.default_rng(s)) for s in (8, 9)]
    assert all(not torch.equal(a[0], o[0]) for o in others)
    with pytest.raises(TypeError, match="rng"):
        t(image, label)


def pfenet_test_resize(image: np.ndarray, label: np.ndarray, test_size: int) -> tuple[np.ndarray, np.ndarray]:
    """PFENet's util/transform.py `test_Resize.__call__`, line for line (float canvases, as PFENet builds them)."""

    def find_new_hw(ori_h, ori_w, test_size):
        if max(ori_h, ori_w) > test_size:
            if ori_h >= ori_w:
                ratio = test_size * 1.0 / ori_h
                new_h = test_size
                new_w = int(ori_w * ratio)
            elif ori_w > ori_h:
                ratio = test_size * 1.0 / ori_w
                new_h = int(ori_h * ratio)
                new_w = test_size
            if new_h % 8 != 0:
                new_h = (int(new_h / 8)) * 8
            else:
                new_h = new_h
            if new_w % 8 != 0:
                new_w = (int(new_w / 8)) * 8
            else:
                new_w = new_w
            return new_h, new_w
        else:
            return ori_h, ori_w

    new_h, new_w = find_new_hw(image.shape[0], image.shape[1], test_size)
    image_crop = cv2.resize(image, dsize=(int(new_w), int(new_h)), interpolation=cv2.INTER_LINEAR)
    back_crop = np.zeros((test_size, test_size, 3))
    back_crop[:new_h, :new_w, :] = image_crop
    image = back_crop
    s_mask = label
    new_h, new_w = find_new_hw(s_mask.shape[0], s_mask.shape[1], test_size)
    s_mask = cv2.resize(s_mask.astype(np.float32), dsize=(int(new_w), int(new_h)), interpolation=cv2.INTER_NEAREST)
    back_crop_s_mask = np.ones((test_size, test_size)) * 255
    back_crop_s_mask[:new_h, :new_w] = s_mask
    label = back_crop_s_mask
    return image, label


def pfenet_resize(image: np.ndarray, label: np.ndarray, test_size: int) -> tuple[np.ndarray, np.ndarray]:
    """PFENet's util/transform.py `Resize.__call__` (what `resized_val: True`, every shipped config, runs), line for
    line (float canvases, as PFENet builds them)."""

    def find_new_hw(ori_h, ori_w, test_size):
        if ori_h >= ori_w:
            ratio = test_size * 1.0 / ori_h
            new_h = test_size
            new_w = int(ori_w * ratio)
        elif ori_w > ori_h:
            ratio = test_size * 1.0 / ori_w
            new_h = int(ori_h * ratio)
            new_w = test_size
        if new_h % 8 != 0:
            new_h = (int(new_h / 8)) * 8
        else:
            new_h = new_h
        if new_w % 8 != 0:
            new_w = (int(new_w / 8)) * 8
        else:
            new_w = new_w
        return new_h, new_w

    new_h, new_w = find_new_hw(image.shape[0], image.shape[1], test_size)
    image_crop = cv2.resize(image, dsize=(int(new_w), int(new_h)), interpolation=cv2.INTER_LINEAR)
    back_crop = np.zeros((test_size, test_size, 3))
    back_crop[:new_h, :new_w, :] = image_crop
    image = back_crop
    s_mask = label
    new_h, new_w = find_new_hw(s_mask.shape[0], s_mask.shape[1], test_size)
    s_mask = cv2.resize(s_mask.astype(np.float32), dsize=(int(new_w), int(new_h)), interpolation=cv2.INTER_NEAREST)
    back_crop_s_mask = np.ones((test_size, test_size)) * 255
    back_crop_s_mask[:new_h, :new_w] = s_mask
    label = back_crop_s_mask
    return image, label


CANVAS_SIZES = [(375, 500), (500, 375), (300, 200), (300, 400), (473, 473), (481, 640), (129, 129), (600, 97)]


def random_pair(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(h * 1000 + w)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    label = rng.choice(np.array([0, 1, 255], np.uint8), size=(h, w), p=[0.6, 0.3, 0.1])
    return image, label


@pytest.mark.parametrize("hw", CANVAS_SIZES)
def test_eval_canvas_is_pfenets_resize(hw: tuple[int, int]) -> None:
    """The default canvas is PFENet's `Resize`: smaller images are scaled up too (300x400 -> 352x472)."""
    image, label = random_pair(*hw)
    img, lbl = eval_transform(473)(image, label)
    assert img.dtype == torch.uint8 and img.shape == (3, 473, 473)
    assert lbl.dtype == torch.uint8 and lbl.shape == (473, 473)
    ref_img, ref_lbl = pfenet_resize(image, label, 473)
    assert np.array_equal(hwc(img).astype(np.float64), ref_img)  # black canvas before normalisation
    assert np.array_equal(lbl.numpy().astype(np.float64), ref_lbl)


@pytest.mark.parametrize("hw", CANVAS_SIZES)
def test_test_resize_option_is_pfenets_test_resize(hw: tuple[int, int]) -> None:
    image, label = random_pair(*hw)
    img, lbl = eval_transform(473, "test_resize")(image, label)
    ref_img, ref_lbl = pfenet_test_resize(image, label, 473)
    assert np.array_equal(hwc(img).astype(np.float64), ref_img)
    assert np.array_equal(lbl.numpy().astype(np.float64), ref_lbl)


def test_canvas_size_floors_both_sides_to_8() -> None:
    assert canvas_size(375, 500, 473) == (352, 472)
    assert canvas_size(500, 375, 473) == (472, 352)
    assert canvas_size(481, 640, 473) == (352, 472)
    assert canvas_size(300, 400, 473) == (352, 472)  # smaller: scaled up as well (PFENet's Resize)
    assert canvas_size(473, 473, 473) == (472, 472)
    assert canvas_size(300, 200, 473, upscale=False) == (300, 200)  # test_Resize: not rescaled, not floored
    assert canvas_size(473, 473, 473, upscale=False) == (473, 473)
    assert canvas_size(481, 640, 473, upscale=False) == (352, 472)
    assert canvas_size(4000, 10, 473) == (472, 8)  # PFENet's would floor the short side to 0


@pytest.mark.parametrize("hw", [(300, 400), (96, 128), (375, 500)])
def test_a_perfect_canvas_prediction_scores_near_100_at_the_original_size(hw: tuple[int, int]) -> None:
    """The evaluation scores the canvas upsampled onto the longer side's square (PFENet's `ori_resize`). With the
    default canvas the image fills the canvas' top-left 472-ish square, so a prediction that is perfect on the
    canvas stays near-perfect at the original size; with test_Resize a small image covers only its own h x w of the
    473 canvas and the scoring misaligns it (44% IoU at 300x400)."""
    from jc2a.metrics import score_at_original_size

    h, w = hw
    label = np.zeros((h, w), np.uint8)
    label[h // 4 : h // 2, w // 5 : w // 2] = 1
    image = np.zeros((h, w, 3), np.uint8)
    ious = {}
    for resize in ("resize", "test_resize"):
        _, canvas_label = eval_transform(473, resize)(image, label)
        logits = torch.stack([(canvas_label != 1).float(), (canvas_label == 1).float()])  # perfect on the canvas
        pred, target = score_at_original_size(logits, torch.from_numpy(label))
        fg, truth = pred == 1, target == 1
        ious[resize] = float((fg & truth).sum() / (fg | truth).sum())
    assert ious["resize"] > 0.95, ious
    if max(h, w) < 473:
        assert ious["test_resize"] < 0.6, ious


def test_eval_canvas_keeps_alignment() -> None:
    image, label = make_pair(240, 320, band=False)
    img, lbl = TestResize(129)(image, label)
    nh, nw = canvas_size(240, 320, 129, upscale=False)
    assert (nh, nw) == (96, 128)
    assert np.all(img[nh:] == 0) and np.all(img[:, nw:] == 0) and np.all(lbl[nh:] == 255) and np.all(lbl[:, nw:] == 255)
    assert_aligned(img[:nh, :nw], lbl[:nh, :nw], min_pixels=100)


def test_eval_is_deterministic_without_rng() -> None:
    image, label = make_pair()
    t = eval_transform(129)
    a, b = t(image, label), t(image, label, np.random.default_rng(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# --------------------------------------------------------------------------- errors and helpers


MISMATCH_STEPS = [
    RandScale(),
    RandRotate(p=1.0, padding=IMAGENET_PIXEL),
    RandomGaussianBlur(p=1.0),
    RandomHorizontalFlip(p=1.0),
    RandCrop(129, padding=IMAGENET_PIXEL),
    TestResize(129),
    Resize(129),
    ToTensor(),
    train_transform(AugmentConfig(), 129, IMAGENET_MEAN),
    eval_transform(129),
]


@pytest.mark.parametrize("step", MISMATCH_STEPS, ids=lambda s: type(s).__name__)
def test_size_mismatch_names_both_sizes(step) -> None:
    image = np.zeros((480, 640, 3), np.uint8)
    label = np.zeros((480, 600), np.uint8)
    with pytest.raises(ValueError, match="image 480x640 but label 480x600"):
        step(image, label, np.random.default_rng(0))


def test_check_size() -> None:
    for size in (473, 641, 129, 9):
        assert check_size(size) == size
    for size in (472, 474, 512, 1, 0, -7):
        with pytest.raises(ValueError, match="473"):
            check_size(size)
    with pytest.raises(ValueError):
        train_transform(AugmentConfig(), 512, IMAGENET_MEAN)
    with pytest.raises(ValueError):
        eval_transform(500)


def test_mean_pixel() -> None:
    assert mean_pixel(IMAGENET_MEAN) == IMAGENET_PIXEL == (124, 116, 104)
    assert mean_pixel((0.5, 0.0, 1.0)) == (128, 0, 255)


def test_compose_repr_lists_steps() -> None:
    text = repr(train_transform(AugmentConfig(), 473, IMAGENET_MEAN))
    for name in ("RandScale", "RandRotate", "RandomGaussianBlur", "RandomHorizontalFlip", "RandCrop", "ToTensor"):
        assert name in text
    assert isinstance(eval_transform(473), Compose)
