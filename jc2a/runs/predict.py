"""`jc2a predict` and `Predictor`: segment your own query images from K annotated support images.

    jc2a predict --checkpoint runs/coco-f0 --support dog1.jpg:dog1.png --support dog2.jpg:dog2.png \\
        --query park.jpg --query street.jpg --out predictions/

    from jc2a import Predictor
    predictor = Predictor.from_checkpoint("runs/coco-f0")
    result = predictor.predict(query, [support], [mask])   # PIL images or numpy RGB uint8 HxWx3, masks HxW
    result.mask          # uint8 0/1 [H, W] at the query's size
    result.probability   # float32 [H, W] foreground probability

Preprocessing is exactly the evaluation's: query and supports on PFENet's uint8 evaluation canvas (`Resize`, or
`test_Resize` with `data.eval_resize=test_resize`). The canvas logits are mapped back exactly: the query's region
of the canvas (its top-left `canvas_size` corner), resized bilinearly to the query's h x w, so the mask lines up
with the image at any size and keeps its orientation.
All supports go into one forward: K-shot decision-level fusion. Files are read ignoring EXIF orientation, as the
shards are (cv2 IMREAD_IGNORE_ORIENTATION; PIL does not rotate either): a photo a viewer shows rotated is
segmented as stored.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from jc2a.config import Config
from jc2a.data.transforms import eval_canvas
from jc2a.errors import UserError, WriteError
from jc2a.labels import IGNORE_INDEX, MASK_HELP

ImageLike = Union[np.ndarray, "PIL.Image.Image"]  # noqa: F821



@dataclass
class Prediction:
    """A query's prediction at its own size: `mask` uint8 0/1 `[H, W]`, `probability` float32 `[H, W]`."""

    mask: np.ndarray
    probability: np.ndarray

    def __getitem__(self, key: str) -> np.ndarray:  # result["mask"] works too
        return getattr(self, key)


# --------------------------------------------------------------------------- inputs


def read_image(path: Union[str, os.PathLike], max_pixels: Optional[int] = None) -> np.ndarray:
    """An image file as RGB `uint8 [H, W, 3]`, EXIF orientation ignored (as the shards); one-line errors. More than
    `max_pixels` pixels (default `data.max_image_pixels`' default) is refused from the header, before decoding."""
    import cv2

    from jc2a.data.records import MAX_IMAGE_PIXELS, image_size

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image not found")
    image_size(path, str(path), max_pixels or MAX_IMAGE_PIXELS)  # the header only: a bomb is refused here
    data = np.fromfile(path, np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION) if data.size else None
    if image is None:
        raise UserError(f"{path}: unreadable image ({data.size} bytes)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_mask(path: Union[str, os.PathLike], max_pixels: Optional[int] = None) -> np.ndarray:
    """A mask file as `[H, W]` values (palette PNGs as their indices), not yet binarised (`support_mask`). More than
    `max_pixels` pixels (default `data.max_image_pixels`' default) is refused from the header, before decoding."""
    from PIL import UnidentifiedImageError

    from jc2a.data.records import MAX_IMAGE_PIXELS, opened_image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: mask not found")
    try:
        with opened_image(path, str(path), max_pixels or MAX_IMAGE_PIXELS, "mask") as img:
            img.load()
            return mask_array(img, str(path))
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise UserError(f"{path}: unreadable mask ({exc})") from None


def check_device(device: Optional[Union[str, torch.device]]) -> torch.device:
    """`device` as a torch.device this machine has (None: CUDA when available, else the CPU); a UserError in one
    line for a name torch does not know or a device that is not here (`cuda` without CUDA, `cuda:3` of 2)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise UserError(f"device {str(device)[:40]!r}: not a device name (cpu, cuda, cuda:1, mps): {exc}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(
                f"device {str(device)!r}: CUDA is not available on this machine (torch {torch.__version__}, "
                f"built for CUDA {torch.version.cuda or 'none'}); use cpu"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise UserError(f"device {str(device)!r}: this machine has {count} CUDA device(s), cuda:0..{count - 1}")
    elif dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise UserError(f"device {str(device)!r}: MPS (Apple GPU) is not available on this machine; use cpu")
    elif dev.type != "cpu":
        raise UserError(f"device {str(device)!r}: jc2a predicts on cpu, cuda or mps")
    return dev


def image_array(image: ImageLike, name: str) -> np.ndarray:
    """A file path, PIL image or numpy array as RGB `uint8 [H, W, 3]` (grey `[H, W]` repeated; an alpha channel
    dropped; a file read as `read_image` reads it)."""
    if isinstance(image, (str, os.PathLike)):
        return read_image(image)
    if not isinstance(image, np.ndarray):
        if not hasattr(image, "convert"):
            raise ValueError(f"{name}: expected a PIL image or a numpy array, got {type(image).__name__}")
        image = np.asarray(image.convert("RGB"))
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
        raise UserError(f"{name}: expected RGB uint8 [H, W, 3], got {image.dtype} {list(image.shape)}")
    return np.ascontiguousarray(image[..., :3])


def mask_array(mask: Union[np.ndarray, Any], name: str) -> np.ndarray:
    """A file path, PIL image or array as mask values `[H, W]`: palette indices, grey values; colour: black 0,
    white 255, any other colour 1."""
    if isinstance(mask, (str, os.PathLike)):
        return read_mask(mask)
    if not isinstance(mask, np.ndarray):
        if not hasattr(mask, "mode"):
            raise ValueError(f"{name}: expected a PIL image or a numpy array, got {type(mask).__name__}")
        if mask.mode in ("RGB", "RGBA"):
            mask = np.asarray(mask.convert("RGB"))
        elif mask.mode in ("P", "L", "1", "LA", "PA"):
            mask = np.asarray(mask)[..., 0] if mask.mode in ("LA", "PA") else np.asarray(mask)
        else:
            mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[2] in (3, 4):
        rgb = mask[..., :3]
        grey = rgb[..., 0]
        mask = np.where((rgb == grey[..., None]).all(axis=2), grey, 1)
    if mask.ndim != 2:
        raise UserError(f"{name}: expected a mask [H, W], got shape {list(mask.shape)}")
    if mask.dtype == bool:
        mask = mask.astype(np.uint8)
    if not np.issubdtype(mask.dtype, np.integer):
        raise UserError(f"{name}: expected an integer mask, got {mask.dtype}")
    return mask


def support_mask(values: np.ndarray, name: str) -> np.ndarray:
    """Mask values `[H, W]` -> uint8 1 object / 0 background / 255 ignore (see `MASK_HELP`).

    Raises:
        ValueError: no object pixel.
    """
    present = np.unique(values)
    if set(present.tolist()) <= {0, 255}:  # a binary 0/255 mask: 255 is the object
        out = (values == 255).astype(np.uint8)
    else:
        out = (values != 0).astype(np.uint8)
        out[values == IGNORE_INDEX] = IGNORE_INDEX
    if not (out == 1).any():
        raise UserError(f"{name}: empty mask (no object pixel; values {present.tolist()[:8]})")
    return out


# --------------------------------------------------------------------------- the predictor


class Predictor:
    """A trained JC2A that segments queries given K supports, preprocessing as the evaluation does.

    Args:
        model: the network (`load_trained_model`); any module with JC2A's forward works.
        cfg: its config (`data.image_size`, `train.mixed_precision`).
        device: where to run (default: CUDA when available, else CPU).
    """

    def __init__(self, model: torch.nn.Module, cfg: Config, device: Optional[Union[str, torch.device]] = None) -> None:
        self.device = check_device(device)
        self.model = model.to(self.device).eval()
        self.cfg = cfg
        self.size = cfg.data.image_size
        self.canvas = eval_canvas(self.size, cfg.data.eval_resize)

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: Union[str, os.PathLike],
        device: Optional[Union[str, torch.device]] = None,
        configs: Optional[Sequence[Union[str, os.PathLike]]] = None,
        overrides: Sequence[str] = (),
    ) -> Predictor:
        """A predictor from a model file or run folder (a ConfigError names the file of an incompatible config)."""
        from jc2a.runs.network import load_trained_model

        model, cfg = load_trained_model(checkpoint, configs, overrides)
        return cls(model, cfg, device)

    def _autocast(self) -> contextlib.AbstractContextManager:
        """The evaluation's precision: `train.mixed_precision`, fp16 only on CUDA (fp32 on a CPU, as accelerate)."""
        precision = self.cfg.train.mixed_precision
        if precision == "bf16" or (precision == "fp16" and self.device.type == "cuda"):
            dtype = torch.bfloat16 if precision == "bf16" else torch.float16
            return torch.autocast(self.device.type, dtype=dtype)
        return contextlib.nullcontext()

    def prepare_supports(
        self,
        supports: Sequence[ImageLike],
        masks: Sequence[Any],
        names: Optional[Sequence[str]] = None,
        mask_names: Optional[Sequence[str]] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Supports and masks on the test canvas: `[1, K, 3, S, S]` uint8 and `[1, K, S, S]` 0/1/255.

        `names` and `mask_names` name the inputs in error messages (default "support 1", "support 1 mask").
        """
        if len(supports) != len(masks) or not supports:
            raise ValueError(f"need one mask per support and at least one support, got {len(supports)}, {len(masks)}")
        names = list(names) if names else [f"support {k + 1}" for k in range(len(supports))]
        mask_names = list(mask_names) if mask_names else [f"{name} mask" for name in names]
        imgs, targets = [], []
        for image, mask, name, mask_name in zip(supports, masks, names, mask_names):
            image = image_array(image, name)
            values = mask_array(mask, mask_name)
            if values.shape != image.shape[:2]:
                raise UserError(
                    f"{mask_name}: the mask is {values.shape[1]}x{values.shape[0]}, its image {name} is "
                    f"{image.shape[1]}x{image.shape[0]} (width x height); they must match"
                )
            canvas, target = self.canvas(image, support_mask(values, mask_name))
            imgs.append(torch.from_numpy(np.ascontiguousarray(canvas.transpose(2, 0, 1))))
            targets.append(torch.from_numpy(target))
        return torch.stack(imgs)[None], torch.stack(targets)[None]

    @torch.no_grad()
    def predict(
        self,
        query: Union[ImageLike, Sequence[ImageLike]],
        supports: Sequence[ImageLike],
        masks: Sequence[Any],
        names: Optional[Sequence[str]] = None,
    ) -> Union[Prediction, list[Prediction]]:
        """Segment `query` (or each of a list of queries) with the K `supports` and their `masks`.

        Args:
            query: RGB uint8 `[H, W, 3]` array or PIL image; or a list of them (a list of predictions returned).
            supports: K RGB images, any sizes.
            masks: K masks `[H_k, W_k]` (arrays or PIL images, palette PNGs as indices), read as `MASK_HELP` says.
            names: names of the supports for error messages (default "support 1", ...).
        """
        if isinstance(query, (list, tuple)):
            prepared = self.prepare_supports(supports, masks, names)
            return [self.predict_one(q, prepared, f"query {i + 1}") for i, q in enumerate(query)]
        return self.predict_one(query, self.prepare_supports(supports, masks, names), "query")

    @torch.no_grad()
    def predict_one(
        self, query: ImageLike, prepared: tuple[torch.Tensor, torch.Tensor], name: str = "query"
    ) -> Prediction:
        """One query with supports from `prepare_supports` (prepared once for many queries)."""
        # 1. the query on the test canvas (uint8), supports already there
        image = image_array(query, name)
        h, w = image.shape[:2]
        canvas, _ = self.canvas(image, np.zeros((h, w), np.uint8))
        q = torch.from_numpy(np.ascontiguousarray(canvas.transpose(2, 0, 1)))[None].to(self.device)
        s, m = (t.to(self.device) for t in prepared)
        # 2. one forward with all K supports (decision-level fusion inside the model)
        with self._autocast():
            logits = self.model(q, s, m)
        # 3. back to the query: its region of the canvas, resized bilinearly to h x w (half-pixel centres, the
        #    inverse of cv2.INTER_LINEAR's mapping onto the canvas)
        up = canvas_to_image(logits[0].float(), self.canvas.region(h, w), (h, w))
        mask = up.argmax(dim=0).to(torch.uint8)
        probability = up.softmax(dim=0)[1]
        return Prediction(mask.cpu().numpy(), probability.cpu().numpy().astype(np.float32))


def canvas_to_image(logits: torch.Tensor, region: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Canvas logits `[C, S, S]` -> `[C, h, w]`: the image's `region` (`new_h, new_w`, from the top-left corner) of the
    canvas, resized bilinearly to `size` = (h, w) with `align_corners=False`, the pixel-centre convention of the
    cv2 resize that put the image on the canvas; a region already (h, w) is returned as it is."""
    new_h, new_w = region
    crop = logits[:, :new_h, :new_w]
    if (new_h, new_w) == tuple(size):
        return crop
    return F.interpolate(crop[None], size=tuple(size), mode="bilinear", align_corners=False)[0]


# --------------------------------------------------------------------------- the command


def pixel_limit(configs, overrides) -> int:
    """`data.max_image_pixels` of the --config files and a `data.max_image_pixels=` override (the run's own config
    is read with the model, after the inputs)."""
    from jc2a.config import load_config

    mine = [o for o in overrides if o.split("=", 1)[0].strip() == "data.max_image_pixels"]
    return load_config(configs or None, mine).data.max_image_pixels


def split_support(text: str) -> tuple[Path, Path]:
    """`IMG:MASK` -> (image, mask); the split is at the colon after an existing image path when there are several."""
    if ":" not in text:
        raise UserError(f"--support {text}: expected IMG:MASK (an image and its mask, joined by ':')")
    cuts = [i for i, c in enumerate(text) if c == ":" and 0 < i < len(text) - 1]
    for i in cuts:
        if Path(text[:i]).is_file():
            return Path(text[:i]), Path(text[i + 1 :])
    if not cuts:
        raise UserError(f"--support {text}: expected IMG:MASK with both paths non-empty")
    return Path(text[: cuts[0]]), Path(text[cuts[0] + 1 :])


def output_names(queries: Sequence[Path]) -> list[str]:
    """File stems for the outputs; repeated stems get `-2`, `-3`..."""
    seen: dict[str, int] = {}
    names = []
    for q in queries:
        seen[q.stem] = seen.get(q.stem, 0) + 1
        names.append(q.stem if seen[q.stem] == 1 else f"{q.stem}-{seen[q.stem]}")
    return names


def save_prediction(out: Path, name: str, image: np.ndarray, result: Prediction) -> list[Path]:
    """`<name>_mask.png` (0/255), `<name>_overlay.png` (the prediction in the evaluation figures' prediction colour),
    `<name>_prob.png` (the foreground probability in colour, with its colour scale) and `<name>_prob.npy`."""
    import cv2

    from jc2a.runs.figures import PREDICTION, probability_figure
    from jc2a.runs.preview import overlay

    out.mkdir(parents=True, exist_ok=True)
    files = {
        "mask": (out / f"{name}_mask.png", result.mask * np.uint8(255)),
        "overlay": (
            out / f"{name}_overlay.png",
            cv2.cvtColor(overlay(image, result.mask, PREDICTION), cv2.COLOR_RGB2BGR),
        ),
    }
    for path, array in files.values():
        if not cv2.imwrite(os.fspath(path), array):
            raise WriteError(f"{path}: could not be written")
    prob = probability_figure(result.probability, out / f"{name}_prob.png", f"{name}: foreground probability")
    npy = out / f"{name}_prob.npy"
    np.save(npy, result.probability.astype(np.float32))
    return [p for p, _ in files.values()] + [prob, npy]


__all__ = [
    "MASK_HELP",
    "Prediction",
    "Predictor",
    "canvas_to_image",
    "check_device",
    "output_names",
    "pixel_limit",
    "read_image",
    "read_mask",
    "support_mask",
]
