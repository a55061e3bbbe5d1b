"""COCO-20i (interleaved, PFENet/HSNet/BAM) and PASCAL-5i class splits over contiguous class ids."""

from __future__ import annotations

NUM_CLASSES = {"coco20i": 80, "pascal5i": 20}
NUM_FOLDS = 4


def _check(dataset: str, fold: int) -> None:
    if dataset not in NUM_CLASSES:
        raise ValueError(f"unknown dataset {dataset!r}: expected one of {sorted(NUM_CLASSES)}")
    if fold not in range(NUM_FOLDS):
        raise ValueError(f"fold must be 0..{NUM_FOLDS - 1}, got {fold!r}")


def novel_classes(dataset: str, fold: int) -> list[int]:
    """The classes held out in `fold`, as sorted contiguous ids (1-based).

    COCO-20i: `{fold+1, fold+5, ..., fold+77}` (PFENet's `use_split_coco`); PASCAL-5i: `{5*fold+1 .. 5*fold+5}`.
    """
    _check(dataset, fold)
    if dataset == "coco20i":
        return list(range(fold + 1, NUM_CLASSES[dataset] + 1, NUM_FOLDS))
    return list(range(5 * fold + 1, 5 * fold + 6))


def base_classes(dataset: str, fold: int) -> list[int]:
    """The training classes of `fold`: every class that is not novel, sorted contiguous ids."""
    novel = set(novel_classes(dataset, fold))
    return [c for c in range(1, NUM_CLASSES[dataset] + 1) if c not in novel]
