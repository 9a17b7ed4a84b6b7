"""The site's disk cache of preprocessed volumes: identical arrays, read back by a later process, rebuilt on change."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from shared.cache import DEFAULT_CACHE_NAME, SiteCache, use_site_cache
from shared.data import find_cases, make_eval_dataset, make_train_loader

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def site(tiny_data_dir, tmp_path) -> Path:
    """A private copy of one tiny site (the tests change its files), without the cache other tests gave it."""
    return Path(shutil.copytree(tiny_data_dir / "site-a", tmp_path / "site-a",
                                ignore=shutil.ignore_patterns(DEFAULT_CACHE_NAME)))


def _items(cases, cfg, cache=None) -> list[dict]:
    with use_site_cache(cache):
        return [dict(item) for item in make_eval_dataset(cases, cfg)]


def _same(a: list[dict], b: list[dict]) -> bool:
    return all(torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
               and torch.equal(torch.as_tensor(x["image"].affine), torch.as_tensor(y["image"].affine))
               for x, y in zip(a, b, strict=True))


def test_second_use_reads_the_disk_and_gives_identical_arrays(site, tiny_data_config):
    cases = find_cases(site)
    fresh = _items(cases, tiny_data_config)
    first = SiteCache(site / ".fedmri-cache")
    assert _same(_items(cases, tiny_data_config, first), fresh)
    assert first.stats == {"hits": 0, "built": len(cases)}
    later = SiteCache(site / ".fedmri-cache")  # what the next round's fresh ClientApp process sees
    assert _same(_items(cases, tiny_data_config, later), fresh)
    assert later.stats == {"hits": len(cases), "built": 0}


def test_training_batches_are_the_same_with_the_cache(site, tiny_data_config):
    cases = find_cases(site)
    plain = next(iter(make_train_loader(cases, tiny_data_config, seed=3)))
    with use_site_cache(SiteCache(site / ".fedmri-cache")):
        make_train_loader(cases, tiny_data_config, seed=3)  # fills the cache
    cache = SiteCache(site / ".fedmri-cache")
    with use_site_cache(cache):
        cached = next(iter(make_train_loader(cases, tiny_data_config, seed=3)))
    assert cache.stats["hits"] == len(cases) and cache.stats["built"] == 0
    assert torch.equal(plain["image"], cached["image"]) and torch.equal(plain["label"], cached["label"])


def test_a_changed_file_is_rebuilt_and_its_stale_entry_removed(site, tiny_data_config):
    cases = find_cases(site)
    _items(cases, tiny_data_config, SiteCache(site / ".fedmri-cache"))
    entries = sorted((site / ".fedmri-cache" / "preprocessed").glob("*.pt"))
    assert len(entries) == len(cases)

    changed = Path(cases[0]["image"])
    img = nib.load(changed)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32) * 2 + 7, img.affine, img.header), changed)

    cache = SiteCache(site / ".fedmri-cache")
    items = _items(cases, tiny_data_config, cache)
    assert cache.stats == {"hits": len(cases) - 1, "built": 1}
    assert _same(items, _items(cases, tiny_data_config))  # the new content, not the old entry
    now = sorted((site / ".fedmri-cache" / "preprocessed").glob("*.pt"))
    assert len(now) == len(cases) and set(now) != set(entries)


def test_changed_preprocessing_settings_build_new_entries(site, tiny_data_config):
    cases = find_cases(site)
    _items(cases, tiny_data_config, SiteCache(site / ".fedmri-cache"))
    other = dataclasses.replace(tiny_data_config, spacing=(5.0, 5.0, 5.0))
    cache = SiteCache(site / ".fedmri-cache")
    items = _items(cases, other, cache)
    assert cache.stats == {"hits": 0, "built": len(cases)}
    assert _same(items, _items(cases, other))
    sampling_only = dataclasses.replace(tiny_data_config, batch_size=1, samples_per_volume=3)
    cache = SiteCache(site / ".fedmri-cache")
    _items(cases, sampling_only, cache)
    assert cache.stats == {"hits": len(cases), "built": 0}  # sampling settings do not touch the arrays


def test_a_corrupt_entry_is_rebuilt(site, tiny_data_config):
    cases = find_cases(site)
    _items(cases, tiny_data_config, SiteCache(site / ".fedmri-cache"))
    victim = next((site / ".fedmri-cache" / "preprocessed").glob("*.pt"))
    victim.write_bytes(b"not a torch file")
    cache = SiteCache(site / ".fedmri-cache")
    assert _same(_items(cases, tiny_data_config, cache), _items(cases, tiny_data_config))
    assert cache.stats == {"hits": len(cases) - 1, "built": 1}


def test_an_unwritable_location_is_reported_unusable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert not SiteCache(blocker / "cache").usable()
    assert SiteCache(tmp_path / "cache").usable()


@pytest.mark.slow
def test_a_second_process_reads_what_the_first_wrote(site, tiny_data_config):
    """Two real interpreter processes, like two rounds of native Flower: the second builds nothing."""
    code = (
        "import sys; from shared.cache import SiteCache, use_site_cache\n"
        "from shared.data import DataConfig, find_cases, make_eval_dataset\n"
        f"cfg = DataConfig(spacing={tiny_data_config.spacing}, roi_size={tiny_data_config.roi_size})\n"
        "cache = SiteCache(sys.argv[1] + '/.fedmri-cache')\n"
        "with use_site_cache(cache): list(make_eval_dataset(find_cases(sys.argv[1]), cfg))\n"
        "print(cache.stats['hits'], cache.stats['built'])\n"
    )
    runs = [subprocess.run([sys.executable, "-c", code, str(site)], cwd=ROOT, capture_output=True, text=True,
                           timeout=300) for _ in range(2)]
    n = len(find_cases(site))
    assert [r.stdout.split()[-2:] for r in runs] == [["0", str(n)], [str(n), "0"]], [r.stderr[-800:] for r in runs]
