"""Segmenting one volume with a registered model, exactly as training preprocessed its data.

Preprocessing is ``shared.data.preprocess_transforms`` minus the file loader (the upload is
already validated and read): channel first, RAS orientation, ``Spacingd`` to the model's
spacing with border padding. MONAI sliding-window inference pads by replicate, so no zero
enters before the first instance norm. The class probabilities then go back onto the input's
exact grid (linear interpolation, argmax there: ``shared.resample.probabilities_to_grid``);
``labels_to_input_grid`` (nearest neighbour on labels) is kept as the comparison.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from shared.data import DataConfig, preprocess_transforms
from shared.inferer import InferenceOptions, SlidingWindowPredictor, resolve_device
from shared.io import save_segmentation
from shared.labels import NUM_CLASSES, label_name
from shared.registry import data_config_from_meta, load_model, served_version
from shared.resample import probabilities_to_grid, resample_image
from shared.training import predict_logits

__all__ = ["ModelNotFoundError", "ModelLoadError", "ServedModel", "ModelStore", "Segmentation", "preprocessing",
           "prepare_volume", "segment_volume", "labels_to_input_grid", "label_volumes", "input_summary",
           "preview_slices", "encode_segmentation"]


log = logging.getLogger("fedmri.api")


class ModelNotFoundError(LookupError):
    """The requested model version is not in the registry (or none is registered)."""


class ModelLoadError(RuntimeError):
    """A registered version whose weights or metadata cannot be loaded (corrupt or incompatible files)."""


@dataclass
class ServedModel:
    """A loaded network with its registry metadata."""

    version: str
    network: torch.nn.Module
    meta: dict
    data_config: DataConfig

    @property
    def label_names(self) -> dict[int, str]:
        classes = int(self.meta.get("model_config", {}).get("out_channels", NUM_CLASSES))
        return {k: label_name(k) for k in range(classes)}


class ModelStore:
    """Loads registry versions on demand and keeps the last ``cache_size`` in memory (thread-safe).

    With no pinned ``default_version`` the store follows the registry: ``refresh`` (called per
    request, one ``stat`` of ``served.json``) loads a newly served version, warms it up and then
    swaps ``default`` in one assignment; requests already running keep the model they started
    with, so none fails during a swap.

    Args:
        registry_dir: the model registry folder.
        default_version: version used when a request names none; ``None`` means the registry's
            served version (``served.json``), else its newest, followed as it changes.
        cache_size: model versions kept loaded at once (the default one is always kept).
    """

    def __init__(self, registry_dir: Path, default_version: str | None = None, cache_size: int = 4) -> None:
        self.registry_dir = Path(registry_dir)
        self.default_version = default_version
        self.cache_size = cache_size
        self.default: ServedModel | None = None
        self.error: str | None = None  # why no default model is loaded, for /readyz
        self._cache: OrderedDict[str, ServedModel] = OrderedDict()
        self._lock = threading.Lock()
        self._swap_lock = threading.Lock()
        self._served_stamp: tuple | None = None  # served.json's (mtime, inode, size) when last read

    def _stamp(self) -> tuple | None:
        try:
            st = os.stat(self.registry_dir / "served.json")
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_ino, st.st_size)

    def load_default(self) -> ServedModel:
        """Load the default model (at startup); raises ModelNotFoundError when there is none."""
        with self._swap_lock:
            self._served_stamp = self._stamp()  # before reading: a change while loading is seen next time
            return self._load_default()

    def _load_default(self) -> ServedModel:
        version = self.default_version or served_version(self.registry_dir)
        if version is None:
            raise ModelNotFoundError(
                f"no model registered in {self.registry_dir}; run `fedmri train` or `fedmri federate`")
        model = self.get(version)
        # One window through the network now, so the first request does not pay torch's warm-up.
        roi = model.data_config.roi_size
        predict_logits(model.network, torch.zeros((1, *roi)), roi)
        self.default, self.error = model, None  # the swap: one assignment
        return model

    def refresh(self, force: bool = False) -> ServedModel | None:
        """Serve the registry's newly served version, if ``served.json`` changed since it was read.

        Cheap when nothing changed (one ``stat``). One thread loads while the others go on with
        the current model. A version that cannot be loaded leaves the current one served and is
        not retried until ``served.json`` changes again (or ``force``). Returns the default model.
        """
        if self.default_version is not None:
            return self.default
        stamp = self._stamp()
        if not force and (stamp == self._served_stamp or stamp is None):
            return self.default
        if not self._swap_lock.acquire(blocking=force):
            return self.default  # another thread is loading it
        try:
            if force or stamp != self._served_stamp:
                self._served_stamp = stamp
                previous = self.default.version if self.default else None
                try:
                    model = self._load_default()
                except (ModelNotFoundError, ModelLoadError, OSError, ValueError, KeyError) as exc:
                    self.error = f"served version could not be loaded: {exc}" if self.default else str(exc)
                    log.warning("registry changed but its served model could not be loaded (%s); still serving %s",
                                type(exc).__name__, previous)
                else:
                    if model.version != previous:
                        log.info("now serving model %s (was %s)", model.version, previous)
        finally:
            self._swap_lock.release()
        return self.default

    def loaded_versions(self) -> list[str]:
        with self._lock:
            return list(self._cache)

    def get(self, version: str | None = None) -> ServedModel:
        """The model ``version`` (default: the default model), loading it if needed."""
        if version is None:
            if self.default is None:
                raise ModelNotFoundError("no model is loaded")
            return self.default
        with self._lock:  # one load at a time; a second request for the same version waits for it
            if version in self._cache:
                self._cache.move_to_end(version)
                return self._cache[version]
            try:
                network, meta = load_model(self.registry_dir, version)
            except (FileNotFoundError, ValueError):
                raise ModelNotFoundError(f"model version {version!r} not found in the registry") from None
            except Exception as exc:  # truncated model.pt, state dict of another architecture, bad meta.json
                raise ModelLoadError(f"model version {version!r} could not be loaded ({type(exc).__name__})") from exc
            served = ServedModel(version, network, meta, data_config_from_meta(meta))
            self._cache[version] = served
            while len(self._cache) > self.cache_size:
                oldest = next(v for v in self._cache if self.default is None or v != self.default.version)
                del self._cache[oldest]
            return served


@dataclass
class Segmentation:
    """A label map on the input's grid, with the input it came from and stage timings (s)."""

    labels: np.ndarray
    image: np.ndarray
    meta: dict
    model: ServedModel
    timings: dict[str, float] = field(default_factory=dict)


def preprocessing(data_config: DataConfig):
    """Training's preprocessing (``shared.data.preprocess_transforms``) for an already loaded ``"image"``."""
    from monai import transforms as mt

    chain = [t for t in preprocess_transforms(data_config, keys=("image",)) if not isinstance(t, mt.LoadImaged)]
    return mt.Compose(chain)


def prepare_volume(data_config: DataConfig, image: np.ndarray, affine: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """The network's input ``(1, X, Y, Z)`` float32 and its grid's affine: :func:`preprocessing`'s result.

    The model grid's geometry is MONAI's own (``Orientation`` and ``Spacing`` run lazily: affine and
    shape, no voxels). Those two keep the input's axis directions, so the model grid is a
    permutation/flip and scaling of the input grid, and the voxels are resampled there in one
    separable pass straight from the input array (``shared.resample.resample_image``: Spacingd's
    positions and border padding, float64 arithmetic, no oriented copy). Equal to the MONAI chain
    within float32 rounding (``tests/shared/test_resample.py``). With ``zscore`` or an oblique map the
    MONAI chain itself runs.
    """
    from monai import transforms as mt
    from monai.data import MetaTensor

    affine = np.asarray(affine, dtype=np.float64)
    if not data_config.zscore and image.ndim == 3:
        # Geometry only: a zero-stride stand-in of the image's shape carries the pending transforms.
        stand_in = MetaTensor(torch.zeros(1).expand(1, *image.shape), affine=torch.as_tensor(affine))
        geometry = mt.Spacing(pixdim=data_config.spacing, mode="bilinear", padding_mode="border", lazy=True)(
            mt.Orientation(axcodes="RAS", labels=None, lazy=True)(stand_in))
        model_affine = np.asarray(geometry.peek_pending_affine(), dtype=np.float64)
        shape = tuple(int(n) for n in geometry.peek_pending_shape())
        resampled = resample_image(image, affine, model_affine, shape)
        if resampled is not None:
            return torch.from_numpy(resampled).unsqueeze(0), model_affine
    volume = MetaTensor(torch.from_numpy(image), affine=torch.as_tensor(affine),
                        meta={"original_channel_dim": "no_channel"})
    prepared = preprocessing(data_config)({"image": volume})["image"]
    return prepared.as_tensor(), np.asarray(prepared.affine, dtype=np.float64)


def segment_volume(model: ServedModel, image: np.ndarray, meta: dict, overlap: float = 0.25,
                   sw_batch_size: int | None = None, precision: str = "fp32",
                   device: str | None = None) -> Segmentation:
    """Segment a validated 3-D ``image`` (from ``shared.io.load_volume``) and map labels back to its grid.

    Args:
        model: the served network and its data config.
        image: ``(X, Y, Z)`` float array on the input grid.
        meta: ``load_volume`` metadata; its ``affine`` defines the input grid.
        overlap: sliding-window overlap.
        sw_batch_size: windows per forward pass (``None``: ``shared.inferer.windows_per_pass``).
        precision: ``"fp32"`` (MONAI's result), ``"bf16"`` or ``"auto"`` (``shared.inferer``).
        device: where the network runs (``"auto"``: CUDA when available); ``None`` keeps its device.
    """
    timings: dict[str, float] = {}
    start = time.perf_counter()
    prepared, model_grid = prepare_volume(model.data_config, image, meta["affine"])
    timings["preprocess_s"] = time.perf_counter() - start

    start = time.perf_counter()
    predictor = SlidingWindowPredictor(  # MONAI's window grid, inference mode (shared.inferer)
        model.network, model.data_config.roi_size,
        InferenceOptions(overlap=overlap, sw_batch_size=sw_batch_size, precision=precision),
        device=None if device is None else resolve_device(device),
    )
    logits = predictor.logits(prepared)
    timings["inference_s"] = time.perf_counter() - start

    start = time.perf_counter()
    # Class probabilities, not labels, go back to the input grid (linear, then argmax there: shared.resample).
    out = probabilities_to_grid(torch.softmax(logits[0], dim=0), model_grid,
                                np.asarray(meta["affine"], dtype=np.float64), tuple(meta["shape"]))
    if out.shape != tuple(meta["shape"]):
        raise RuntimeError(f"inverted label map has shape {out.shape}, expected {tuple(meta['shape'])}")
    timings["postprocess_s"] = time.perf_counter() - start
    return Segmentation(out, image, meta, model, timings)


def labels_to_input_grid(labels: np.ndarray, model_affine: np.ndarray, input_affine: np.ndarray,
                         input_shape: tuple[int, int, int]) -> np.ndarray | None:
    """Nearest-neighbour resampling of a label map from the model's grid onto the input's grid.

    ``Orientationd`` and ``Spacingd`` only permute, flip and rescale voxel axes (directions are
    kept), so each input axis reads along one model axis and the resampling is an index gather:
    exact, and two orders of magnitude faster than a dense sampling grid of a 1 mm volume.
    Outside the model grid the border label is used (``padding_mode="border"``); ties (an input
    voxel centre exactly between two model voxels) round half to even.

    Returns:
        ``uint8`` labels of ``input_shape``, or ``None`` when the grids are not axis-aligned to
        each other (the caller then resamples with MONAI).
    """
    voxel_map = np.linalg.solve(model_affine, input_affine)  # input voxel index -> model voxel index
    linear = voxel_map[:3, :3]
    model_axis = np.abs(linear).argmax(axis=0)  # the model axis each input axis runs along
    off_axis = linear.copy()
    off_axis[model_axis, range(3)] = 0
    if len(set(model_axis.tolist())) != 3 or np.abs(off_axis).max() > 1e-6 * np.abs(linear).max():
        return None
    index = []
    for axis in range(3):
        row = model_axis[axis]
        position = linear[row, axis] * np.arange(input_shape[axis]) + voxel_map[row, 3]
        nearest = np.rint(np.round(position, 6))  # snap float noise so exact ties stay ties
        index.append(np.clip(nearest, 0, labels.shape[row] - 1).astype(np.intp))
    aligned = np.transpose(labels, model_axis)  # axis k of ``aligned`` runs along input axis k
    return np.ascontiguousarray(aligned[np.ix_(*index)], dtype=np.uint8)


def label_volumes(labels: np.ndarray, affine: np.ndarray, names: dict[int, str]) -> list[dict]:
    """Per-label voxel counts and volumes in mL (voxel volume from the affine, so shear counts too)."""
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0
    counts = np.bincount(labels.ravel(), minlength=len(names))
    return [
        {"label": k, "name": name, "voxels": int(counts[k]), "ml": round(float(counts[k]) * voxel_ml, 4)}
        for k, name in names.items()
        if k != 0
    ]


def input_summary(meta: dict) -> dict:
    """Geometry of the input: header shape, voxel size, orientation codes, NIfTI version, q/sform codes."""
    header = meta["header"]
    return {
        "shape": list(meta.get("full_shape", meta["shape"])),
        "spacing_mm": [round(float(v), 6) for v in meta["spacing"]],
        "orientation": "".join(nib.aff2axcodes(meta["affine"])),
        "nifti_version": int(meta.get("nifti_version", 1)),
        "qform_code": int(header["qform_code"]),
        "sform_code": int(header["sform_code"]),
    }


def encode_segmentation(seg: Segmentation, work_dir: Path) -> bytes:
    """The label map as ``.nii.gz`` bytes, with the input's shape, affine and qform/sform codes.

    Written uncompressed, then gzipped by ISA-L (``isal``, level 1) where installed: a 1 mm label
    map compresses in milliseconds instead of zlib's tenths of a second; the stream is plain gzip.
    """
    path = work_dir / "segmentation.nii"
    save_segmentation(seg.labels.reshape(seg.meta.get("full_shape", seg.meta["shape"])), path, seg.meta)
    data = path.read_bytes()
    path.unlink()
    try:
        from isal import igzip as gzip_impl
    except ImportError:  # optional: the standard library's gzip gives the same format
        import gzip as gzip_impl
    return gzip_impl.compress(data, 1)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    finite = image[np.isfinite(image)]
    lo, hi = (np.percentile(finite, (1, 99)) if finite.size else (0.0, 1.0))
    scaled = (image - lo) / max(float(hi - lo), 1e-6)
    return (np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def preview_slices(seg: Segmentation) -> list[dict]:
    """Three orthogonal slices in RAS display orientation through the labelled region's centre.

    Each slice has ``width``, ``height``, ``pixel_mm`` and base64 ``image``/``labels`` bytes
    (uint8, row-major, first row at the top: superior or anterior).
    """
    ornt = nib.orientations.io_orientation(seg.meta["affine"])
    image = nib.orientations.apply_orientation(_to_uint8(seg.image), ornt)
    labels = nib.orientations.apply_orientation(seg.labels, ornt)
    spacing = np.asarray(seg.meta["spacing"])[ornt[:, 0].astype(int).argsort()]
    fg = np.argwhere(labels > 0)
    centre = fg.mean(axis=0).round().astype(int) if len(fg) else np.asarray(labels.shape) // 2
    planes = (("sagittal", 0, (1, 2)), ("coronal", 1, (0, 2)), ("axial", 2, (0, 1)))
    out = []
    for name, axis, (horizontal, vertical) in planes:
        index = int(centre[axis])
        take = [slice(None)] * 3
        take[axis] = index
        # (horizontal, vertical) array -> rows top-down: transpose, then flip so +vertical is up.
        img2d = np.ascontiguousarray(image[tuple(take)].T[::-1])
        lab2d = np.ascontiguousarray(labels[tuple(take)].T[::-1])
        out.append({
            "plane": name,
            "index": index,
            "width": int(img2d.shape[1]),
            "height": int(img2d.shape[0]),
            "pixel_mm": [float(spacing[horizontal]), float(spacing[vertical])],
            "image": base64.b64encode(img2d.tobytes()).decode("ascii"),
            "labels": base64.b64encode(lab2d.tobytes()).decode("ascii"),
        })
    return out
