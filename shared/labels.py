"""The segmentation's label vocabulary: names, class count and the label groups metrics use."""

from __future__ import annotations

__all__ = ["BACKGROUND", "FOREGROUND_LABELS", "LABELS", "LESION_LABEL", "NUM_CLASSES", "TISSUE_LABELS", "label_name"]

LABELS: dict[int, str] = {0: "background", 1: "grey matter", 2: "white matter", 3: "lesion"}
NUM_CLASSES = len(LABELS)
BACKGROUND = 0
FOREGROUND_LABELS: tuple[int, ...] = tuple(k for k in LABELS if k != BACKGROUND)
# Labels every case has (lesions occur in some cases only): fairness is also judged on these.
TISSUE_LABELS: tuple[int, ...] = (1, 2)
LESION_LABEL = 3


def label_name(label: int) -> str:
    return LABELS.get(label, f"label {label}")
