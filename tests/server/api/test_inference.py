"""Geometry of the inference pipeline: labels land on the input's exact grid, whatever its orientation.

The network here is a fixed threshold (label 1 where intensity > t), so the right label map is
known voxel by voxel; what is tested is the real MONAI preprocessing, sliding window and Invertd.
"""

from __future__ import annotations

import base64

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from server.api.inference import (
    ServedModel,
    label_volumes,
    labels_to_input_grid,
    preprocessing,
    preview_slices,
    segment_volume,
)
from shared.data import DataConfig

THRESHOLD = 500.0

# Voxel axes -> world: anisotropic and not RAS (x flipped, y and z swapped and flipped), and an oblique one.
LPS_ANISO = np.array([[-1.0, 0, 0, 30], [0, 0, 3.0, -40], [0, -1.5, 0, 25], [0, 0, 0, 1]])
_rot = np.array([[np.cos(0.35), -np.sin(0.35), 0], [np.sin(0.35), np.cos(0.35), 0], [0, 0, 1]])
OBLIQUE = np.eye(4)
OBLIQUE[:3, :3] = _rot @ np.diag([1.2, 0.9, 2.5])
OBLIQUE[:3, 3] = [3, -7, 11]


class ThresholdNet(nn.Module):
    """Two-class logits ``[0, x - t]``: label 1 exactly where the intensity exceeds ``t``."""

    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.threshold = nn.Parameter(torch.tensor(threshold), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x), x - self.threshold], dim=1)


def _served(spacing) -> ServedModel:
    cfg = DataConfig(spacing=spacing, roi_size=(16, 16, 16))
    return ServedModel("threshold", ThresholdNet(THRESHOLD).eval(), {"model_config": {"out_channels": 2}}, cfg)


def _meta(image: np.ndarray, affine: np.ndarray) -> dict:
    img = nib.Nifti1Image(image, affine)
    return {"affine": affine, "header": img.header, "shape": image.shape, "spacing": img.header.get_zooms()[:3]}


def _ras_spacing(affine: np.ndarray) -> tuple[float, ...]:
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    ornt = nib.orientations.io_orientation(affine)
    return tuple(float(zooms[i]) for i in ornt[:, 0].astype(int).argsort())


def _world_centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return nib.affines.apply_affine(affine, np.argwhere(mask).mean(axis=0))


@pytest.mark.parametrize("affine", [LPS_ANISO, np.diag([2.0, 2.0, 2.0, 1.0])], ids=["lps-anisotropic", "ras-2mm"])
def test_labels_exact_when_model_spacing_matches(phantom, affine):
    """Same voxel size as the model: orientation and its inverse are the only changes, so the round trip is exact."""
    image = phantom((30, 22, 14))
    seg = segment_volume(_served(_ras_spacing(affine)), image, _meta(image, affine))
    assert seg.labels.shape == image.shape and seg.labels.dtype == np.uint8
    np.testing.assert_array_equal(seg.labels, (image > THRESHOLD).astype(np.uint8))


@pytest.mark.parametrize("affine", [LPS_ANISO, OBLIQUE], ids=["lps-anisotropic", "oblique"])
def test_labels_land_in_the_right_place_after_resampling(phantom, affine):
    """Resampled to 2 mm and back: the blob keeps its world position and almost every voxel."""
    image = phantom((40, 30, 20))
    seg = segment_volume(_served((2.0, 2.0, 2.0)), image, _meta(image, affine))
    truth = image > THRESHOLD
    assert seg.labels.shape == image.shape
    dice = 2 * np.logical_and(seg.labels == 1, truth).sum() / ((seg.labels == 1).sum() + truth.sum())
    assert dice > 0.85
    shift = np.linalg.norm(_world_centroid(seg.labels == 1, affine) - _world_centroid(truth, affine))
    assert shift < 1.0, f"label blob moved {shift:.2f} mm"


def test_label_volumes_use_voxel_size():
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[:5] = 1
    labels[0, 0, :4] = 3
    names = {0: "bg", 1: "gm", 2: "wm", 3: "lesion"}
    volumes = {v["name"]: v for v in label_volumes(labels, np.diag([2.0, 1.0, 0.5, 1.0]), names)}
    assert set(volumes) == {"gm", "wm", "lesion"}
    assert volumes["gm"]["voxels"] == 496 and volumes["gm"]["ml"] == 0.496
    assert volumes["wm"]["voxels"] == 0 and volumes["lesion"]["ml"] == pytest.approx(0.004)


def test_preview_slices_are_in_ras_display_orientation(phantom):
    """The axial preview of an LPS-stored volume shows anterior at the top and patient right on the right."""
    image = phantom((30, 22, 14))
    seg = segment_volume(_served(_ras_spacing(LPS_ANISO)), image, _meta(image, LPS_ANISO))
    slices = {s["plane"]: s for s in preview_slices(seg)}
    assert set(slices) == {"sagittal", "coronal", "axial"}
    ras = nib.orientations.apply_orientation(seg.labels, nib.orientations.io_orientation(LPS_ANISO))
    axial = slices["axial"]
    assert (axial["width"], axial["height"]) == (ras.shape[0], ras.shape[1])
    shown = np.frombuffer(base64.b64decode(axial["labels"]), np.uint8).reshape(axial["height"], axial["width"])
    np.testing.assert_array_equal(shown, ras[:, :, axial["index"]].T[::-1])
    assert shown.any()


@pytest.mark.parametrize(
    "affine, spacing",
    [(LPS_ANISO, (2.0, 2.0, 2.0)), (OBLIQUE, (1.5, 1.0, 2.0)), (np.diag([0.7, 1.3, 2.9, 1.0]), (2.0, 2.0, 2.0))],
    ids=["lps-to-2mm", "oblique-to-aniso", "fine-to-2mm"],
)
def test_nearest_back_agrees_with_monai_invertd(phantom, affine, spacing):
    """The fast gather gives MONAI Invertd's labels except where a voxel centre ties between two model voxels."""
    from monai import transforms as mt
    from monai.data import MetaTensor

    image = phantom((40, 30, 20))
    transform = preprocessing(DataConfig(spacing=spacing, roi_size=(16, 16, 16)))
    prepared = transform({"image": MetaTensor(torch.from_numpy(image), affine=torch.as_tensor(affine),
                                              meta={"original_channel_dim": "no_channel"})})
    model_labels = ((prepared["image"] > THRESHOLD).int() + (prepared["image"] > 750).int()).to(torch.uint8)
    model_affine = prepared["image"].affine.numpy()
    ours = labels_to_input_grid(model_labels[0].numpy(), model_affine, affine, image.shape)
    invert = mt.Invertd(keys="pred", transform=transform, orig_keys="image", nearest_interp=True)
    pred = MetaTensor(model_labels, affine=prepared["image"].affine)
    reference = invert({"image": prepared["image"], "pred": pred})["pred"]
    reference = np.rint(reference[0].numpy()).astype(np.uint8)
    assert ours.shape == reference.shape == image.shape
    differ = ours != reference
    assert differ.mean() < 0.05
    # Every disagreement sits on a tie: some axis lands exactly half-way between two model voxels.
    voxel_map = np.linalg.solve(model_affine, affine)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in image.shape], indexing="ij"), -1)[differ]
    positions = grid @ voxel_map[:3, :3].T + voxel_map[:3, 3]
    assert np.all(np.any(np.isclose(np.abs(positions - np.floor(positions)), 0.5, atol=1e-6), axis=1))


def test_nearest_back_refuses_rotated_grids():
    rotated = np.eye(4)
    rotated[:3, :3] = _rot
    assert labels_to_input_grid(np.zeros((4, 4, 4), np.uint8), rotated, np.eye(4), (4, 4, 4)) is None
