"""`jc2a bank`: CKMM's prototype bank (Eqs. 11-12) in one pass over the fold's base-class training images.

Each rank takes a disjoint share of the images, the sums and counts are all-reduced (summed), so every rank ends
with the same bank, whatever the number of ranks; the main process saves it as safetensors with a fingerprint
(backbone and its weights, dataset, fold, image size, min_pixels, training index checksum).

    jc2a bank --config configs/coco20i.yaml --out shards/coco/bank-f0-resnet50.safetensors
    accelerate launch -m jc2a bank --config configs/coco20i.yaml --out bank.safetensors   # several processes
    torchrun --nproc_per_node 4 -m jc2a bank --config configs/coco20i.yaml --out bank.safetensors
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Union

import torch
from accelerate.utils import send_to_device
from torch import nn

from jc2a.config import Config, ConfigError, load_config
from jc2a.data.episodes import bank_loader, label_masks, open_shards
from jc2a.data.locations import ShardSet
from jc2a.progress import progress as show_progress
from jc2a.runs.files import load_bank, save_bank
from jc2a.runs.session import make_accelerator, setup_logging

log = logging.getLogger("jc2a.runs")


@torch.no_grad()
def build_bank(accelerator, model, cfg: Config, shards: ShardSet, progress: bool = True) -> int:
    """Fill `model.prototype_bank` from this rank's share of the images, then all-reduce; every rank ends with the
    same numbers. Returns the instances added over all ranks.

    Args:
        accelerator: the run's Accelerator (its process index and count give the share).
        model: the unwrapped JC2A on `accelerator.device`.
        cfg: the run's config (dataset, fold, image size, min_pixels, workers).
        shards: the training split.
    """
    bank = model.prototype_bank
    if bank is None:
        raise ConfigError("model.ckmm.enabled is false: there is no prototype bank to build")
    bank.reset()
    loader = bank_loader(cfg.data, accelerator.process_index, accelerator.num_processes, batch_size=4, shards=shards)
    total = loader.dataset.instances()
    bar = show_progress(
        total=len(loader.dataset),
        desc=f"CKMM bank (rank {accelerator.process_index})" if accelerator.num_processes > 1 else "CKMM bank",
        unit="img",
        disable=not (progress and accelerator.is_local_main_process),
    )
    skipped = 0
    for batch in loader:
        bar.update(len(batch["classes"]))
        skipped += int(batch["skipped"].sum())
        if not any(batch["classes"]):  # every image of the batch was unreadable
            continue
        batch = send_to_device(batch, accelerator.device, non_blocking=True)
        # 1. one backbone pass per image, 2. one instance per usable base class of the image (Eq. 11)
        owner = torch.tensor([i for i, cs in enumerate(batch["classes"]) for _ in cs], device=accelerator.device)
        classes = torch.tensor([c for cs in batch["classes"] for c in cs], device=accelerator.device)
        masks = torch.cat([label_masks(batch["label"][i], cs) for i, cs in enumerate(batch["classes"])])
        feats = model.extract_bank_features(batch["image"])  # uint8: normalised by the backbone
        bank.update(feats[owner], masks, classes)
    bar.close()
    # 3. sums and counts added over the ranks (Eq. 12 divides them on use)
    bank.all_reduce()
    added = int(bank.counts.sum())
    if skipped:
        log.warning(
            "CKMM bank: %d unreadable image(s) of rank %d skipped (named above)", skipped, accelerator.process_index
        )
    if added != total:
        log.warning(
            "CKMM bank: %d of %d instances added (the others had no target pixel at feature size)", added, total
        )
    return added


def ensure_bank(accelerator, model, cfg: Config, shards: ShardSet, out: Path, progress: bool = True) -> str:
    """Make `model.prototype_bank` hold the bank of this config, reusing a file whose fingerprint matches.

    `model.ckmm.bank_file`, when set and present, must match (a mismatch is refused with one line); else `out` is
    reused when it matches; else the bank is built and the main process saves it to `out`. Returns what happened:
    "loaded FILE", "reused FILE" or "built FILE".
    """
    fingerprint = bank_fingerprint(cfg, model, shards.checksum)
    given = cfg.model.ckmm.bank_file
    if given:
        if Path(given).exists():
            load_bank(model.prototype_bank, given, fingerprint)
            return f"loaded {given}"
        log.info("model.ckmm.bank_file %s does not exist yet: building it", given)
        out = Path(given)
    if out.is_file():
        try:
            load_bank(model.prototype_bank, out, fingerprint)
            return f"reused {out}"
        except ValueError as exc:
            log.info("not reusing %s: %s", out, exc)
    build_bank(accelerator, model, cfg, shards, progress)
    if accelerator.is_main_process:
        save_bank(model.prototype_bank, out, fingerprint)
    accelerator.wait_for_everyone()
    return f"built {out}"


# --------------------------------------------------------------------------- command line


def bank_main(config: Optional[list], overrides: list[str], out: Union[str, os.PathLike], progress: bool) -> int:
    from accelerate.utils import set_seed

    from jc2a.runs.network import build_network

    setup_logging()
    cfg = load_config(config, overrides)
    if not cfg.model.ckmm.enabled:
        raise ConfigError("model.ckmm.enabled is false: this config has no prototype bank")
    cfg.model.ckmm.bank_file = None  # `--out` is what is written
    accelerator = make_accelerator(cfg)
    set_seed(cfg.train.seed)  # as `jc2a train`: a randomly initialised backbone is the same on every rank
    shards = open_shards(cfg.data, cfg.data.train_split)
    model = build_network(cfg).to(accelerator.device).eval()
    fingerprint = bank_fingerprint(cfg, model, shards.checksum)
    added = build_bank(accelerator, model, cfg, shards, progress)
    if accelerator.is_main_process:
        save_bank(model.prototype_bank, out, fingerprint)
        seen = int(model.prototype_bank.seen.sum())
        print(
            f"CKMM bank: {added} instances of {seen} base classes from {accelerator.num_processes} process(es) -> {out}"
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


def bank_fingerprint(cfg: Config, model: nn.Module, index_checksum: str) -> dict[str, str]:
    """What a prototype bank depends on: a bank file is reused only when all of it matches."""
    backbone = model.backbone
    return {
        "backbone": cfg.model.backbone.name,
        "weights": backbone.weights_digest(),
        "dataset": cfg.data.dataset,
        "fold": str(cfg.data.fold),
        "image_size": str(cfg.data.image_size),
        "canvas": cfg.data.eval_resize,
        "min_pixels": str(cfg.data.min_pixels),
        "train_index": index_checksum,
    }
