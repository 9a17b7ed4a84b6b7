"""Input-harmonization baselines (intensity-normalization's Nyúl and WhiteStripe) computed per site."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from server.experiments.harmonize import harmonize_data
from shared.data import find_cases


@pytest.mark.parametrize("method", ["nyul", "whitestripe"])
def test_harmonized_mirror_removes_the_scanner_scale(tiny_data_dir, tmp_path, method):
    out = tmp_path / method
    info = harmonize_data(tiny_data_dir, out, method)
    assert info["sites"] == ["site-a", "site-b", "site-c"]
    medians = []
    for site in info["sites"]:
        src, dst = find_cases(tiny_data_dir / site, "train"), find_cases(out / site, "train")
        assert [c["name"] for c in src] == [c["name"] for c in dst]
        for a, b in zip(src, dst):
            assert np.array_equal(nib.load(a["label"]).get_fdata(), nib.load(b["label"]).get_fdata())
            img = nib.load(b["image"])
            assert np.allclose(img.affine, nib.load(a["image"]).affine)
        data = nib.load(dst[0]["image"]).get_fdata()
        medians.append(float(np.median(data[data > np.percentile(data, 60)])))
        assert (out / site / "scanner.json").is_file() and (out / site / "dataset.json").is_file()
    # Raw site-a and site-b differ by x4 and -300; after harmonization their bright tissue is alike.
    assert max(medians[:2]) / min(medians[:2]) < 1.3
    if method == "nyul":  # only the landmark vectors were shared: one per site, averaged
        assert set(info["scales"]) == set(info["sites"])
        assert np.allclose(np.mean([info["scales"][s] for s in info["sites"]], axis=0), info["standard_scale"])
    assert json.loads((out / "harmonized.json").read_text())["method"] == method
    assert harmonize_data(tiny_data_dir, out, method) == info  # reused, not recomputed
