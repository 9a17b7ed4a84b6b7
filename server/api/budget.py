"""Work budget of one request, computed from the header alone, and the bound on requests in flight.

A small file can ask for a lot of work: 48^3 voxels that declare 24 mm spacing become 576^3
voxels on a 2 mm model grid. ``WorkBudget.check`` computes, before any voxel is read, the
voxel count of the input grid, of the model grid after ``Orientationd(RAS)`` and ``Spacingd``
(exactly as MONAI sizes it) and the voxels the sliding windows then run through, and refuses
what is beyond the limits with a :class:`LimitExceededError` (422) naming the limit and the
numbers. ``AdmissionGate`` bounds the requests in flight (running plus waiting): one more is
answered 503 with ``Retry-After`` instead of queueing without end.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from shared.errors import InvalidVolumeError

__all__ = ["LimitExceededError", "GridCost", "WorkBudget", "model_grid_shape", "window_count", "AdmissionGate",
           "QueueFullError"]

SOURCE = "upload"


class LimitExceededError(InvalidVolumeError):
    """A volume whose work is beyond a configured limit; carries the setting and the numbers."""

    def __init__(self, message: str, *, limit: str, value: int | float | None, maximum: int) -> None:
        super().__init__(message)
        self.limit, self.value, self.maximum = limit, value, maximum


@dataclass(frozen=True)
class GridCost:
    """What segmenting one volume costs, in voxels."""

    input_shape: tuple[int, int, int]
    model_shape: tuple[float, float, float]  # floats: a hostile header may ask for more than int64 holds
    windows: float
    window_voxels: float

    @property
    def input_voxels(self) -> int:
        return math.prod(self.input_shape)

    @property
    def model_voxels(self) -> float:
        return math.prod(self.model_shape)


def model_grid_shape(shape: Sequence[int], affine: np.ndarray, spacing: Sequence[float]) -> tuple[float, float, float]:
    """Shape of the volume after MONAI's ``Orientation("RAS")`` and ``Spacing(spacing)`` (border-padded).

    Mirrors ``monai.data.utils.zoom_affine`` and ``compute_shape_offset`` (corner extent + 1,
    rounded) in floating point, so absurd headers give huge numbers rather than overflow.
    """
    from monai.data.utils import zoom_affine

    affine = np.asarray(affine, dtype=np.float64)
    orientations = nib.orientations
    ornt = orientations.ornt_transform(orientations.io_orientation(affine), orientations.axcodes2ornt("RAS"))
    oriented_shape = [0.0] * 3
    for axis, (target, _) in enumerate(ornt):
        oriented_shape[int(target)] = float(shape[axis])
    oriented = affine @ orientations.inv_ornt_aff(ornt, [int(n) for n in shape])
    new_affine = zoom_affine(oriented, np.asarray(spacing, dtype=np.float64), diagonal=False)
    corners = np.asarray(np.meshgrid(*[(0.0, n - 1.0) for n in oriented_shape], indexing="ij")).reshape(3, -1)
    corners = np.concatenate((corners, np.ones_like(corners[:1])))
    out = np.linalg.solve(new_affine, oriented) @ corners
    extent = np.round(np.ptp(out[:3] / out[3], axis=1) + 1.0)
    return tuple(float(n) for n in extent)  # type: ignore[return-value]


def window_count(size: float, roi: int, overlap: float) -> float:
    """Sliding windows MONAI's ``sliding_window_inference`` runs along one axis of ``size`` voxels."""
    image = max(size, roi)  # smaller volumes are padded up to the window
    interval = roi if image == roi else max(int(roi * (1 - overlap)), 1)
    return math.ceil(max(image - roi, 0) / interval) + 1


@dataclass(frozen=True)
class WorkBudget:
    """Limits on one request's work, checked from the header before any voxel is read.

    Args:
        max_voxels: voxels of the input grid (``FEDMRI_MAX_VOXELS``).
        max_model_voxels: voxels of the model grid after resampling (``FEDMRI_MAX_MODEL_VOXELS``).
        max_window_voxels: voxels the sliding windows run through (``FEDMRI_MAX_WINDOW_VOXELS``).
        overlap: sliding-window overlap the service runs with.
    """

    max_voxels: int
    max_model_voxels: int
    max_window_voxels: int
    overlap: float = 0.25

    def cost(self, shape: Sequence[int], affine: np.ndarray, spacing: Sequence[float], roi: Sequence[int]) -> GridCost:
        model = model_grid_shape(shape[:3], affine, spacing)
        windows = math.prod(window_count(n, int(r), self.overlap) for n, r in zip(model, roi))
        return GridCost(tuple(int(n) for n in shape[:3]), model, windows, windows * math.prod(int(r) for r in roi))

    def check(self, shape: Sequence[int], affine: np.ndarray, spacing: Sequence[float], roi: Sequence[int]) -> GridCost:
        """The cost of segmenting a volume of ``shape``/``affine`` with a model at ``spacing``/``roi``.

        Raises:
            LimitExceededError: naming the limit, the volume's number and the maximum.
        """
        voxels = math.prod(int(n) for n in shape[:3])
        if voxels > self.max_voxels:
            raise LimitExceededError(
                f"{SOURCE}: header claims {voxels} voxels, more than the limit of {self.max_voxels}",
                limit="FEDMRI_MAX_VOXELS", value=_number(voxels), maximum=self.max_voxels)
        cost = self.cost(shape, affine, spacing, roi)
        grid = "x".join(f"{n:.0f}" for n in cost.model_shape)
        mm = "x".join(f"{s:g}" for s in spacing)
        if not cost.model_voxels <= self.max_model_voxels:  # also refuses NaN
            raise LimitExceededError(
                f"{SOURCE}: resampled to the model's {mm} mm grid the volume would have {grid} = "
                f"{cost.model_voxels:.0f} voxels, more than the limit of {self.max_model_voxels} "
                "(voxel size too large for its shape?)",
                limit="FEDMRI_MAX_MODEL_VOXELS", value=_number(cost.model_voxels), maximum=self.max_model_voxels)
        if not cost.window_voxels <= self.max_window_voxels:
            raise LimitExceededError(
                f"{SOURCE}: the sliding-window pass over the {grid} model grid would process "
                f"{cost.window_voxels:.0f} voxels ({cost.windows:.0f} windows), "
                f"more than the limit of {self.max_window_voxels}",
                limit="FEDMRI_MAX_WINDOW_VOXELS", value=_number(cost.window_voxels), maximum=self.max_window_voxels)
        return cost


def _number(value: float) -> int | float | None:
    """A JSON-safe number: exact below 2**53, a float above, None when not finite."""
    if not math.isfinite(value):
        return None
    return int(value) if abs(value) < 2**53 else float(value)


class QueueFullError(Exception):
    """More requests in flight than the service admits; answer 503 and ask to retry later."""

    def __init__(self, in_flight: int, limit: int, retry_after_s: int) -> None:
        super().__init__(
            f"server busy: {in_flight} segmentation requests in flight, the limit is {limit} "
            f"(FEDMRI_MAX_CONCURRENT_INFERENCES + FEDMRI_MAX_QUEUED_REQUESTS); retry after {retry_after_s} s"
        )
        self.retry_after_s = retry_after_s


class AdmissionGate:
    """Counts segmentation requests in flight (uploading, waiting or running); refuses beyond ``limit``.

    Used from the event loop only (admission and release are plain counter updates there), so no
    lock is needed. ``Retry-After`` is the recent mean request time times the queue's length in
    rounds of ``concurrency``, clamped to 1-300 s.
    """

    def __init__(self, concurrency: int, queued: int) -> None:
        self.concurrency, self.limit = concurrency, concurrency + queued
        self.in_flight = 0
        self.mean_s = 5.0  # until requests have been timed
        self._started: dict[int, float] = {}
        self._next = 0

    def admit(self) -> int:
        """A ticket for one request, or QueueFullError when ``limit`` are in flight."""
        if self.in_flight >= self.limit:
            rounds = self.in_flight / self.concurrency
            raise QueueFullError(self.in_flight, self.limit, int(min(max(math.ceil(self.mean_s * rounds), 1), 300)))
        self.in_flight += 1
        self._next += 1
        self._started[self._next] = time.monotonic()
        return self._next

    def release(self, ticket: int, timed: bool = True) -> None:
        started = self._started.pop(ticket, None)
        if started is None:
            return
        self.in_flight -= 1
        if timed:
            self.mean_s = 0.8 * self.mean_s + 0.2 * (time.monotonic() - started)
