"""The web page with a DICOM series: upload a zip in headless Chromium, see the overlay, volumes and the OOD warning."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from shared.dicom import make_mr_series, series_to_zip
from shared.ood import _in_signal_range, build_record, site_reference_from_dir, write_ood
from shared.scanner import ScannerProfile

pytestmark = pytest.mark.slow

CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--window-size=1280,1000",
)


@pytest.fixture(scope="module")
def api_registry(api_registry, tiny_data_dir, tmp_path_factory):
    """The session registry, copied, with an OOD reference from the tiny sites (the live server serves this one)."""
    registry = tmp_path_factory.mktemp("browser-registry") / "registry"
    shutil.copytree(api_registry, registry)
    sites = {p.name: site_reference_from_dir(p) for p in sorted(tiny_data_dir.iterdir()) if p.is_dir()}
    write_ood(registry, "tiny", build_record(sites))
    return registry


def _upload(browser, path: Path) -> str:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.find_element(By.ID, "file").send_keys(str(path))
    browser.find_element(By.ID, "submit").click()
    WebDriverWait(browser, 180).until(
        lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("done", "error")
    )
    return browser.find_element(By.TAG_NAME, "body").get_attribute("data-state")


def test_dicom_zip_upload_and_ood_warning_in_headless_chromium(chromium, live_server, site_case, tmp_path):
    from selenium.webdriver.common.by import By

    img = nib.load(site_case[0])
    volume = np.asarray(img.dataobj, dtype=np.float32)
    plain = tmp_path / "series.zip"
    series_to_zip(make_mr_series(volume, img.affine), plain)
    curved = tmp_path / "curved.zip"  # the same brain through a strong gamma curve: unlike every site
    series_to_zip(make_mr_series(_in_signal_range(volume, ScannerProfile(gamma=0.3), None), img.affine), curved)

    browser = chromium(CHROMIUM_FLAGS)
    try:
        browser.get(live_server["url"] + "/")
        assert ".zip" in browser.find_element(By.ID, "file").get_attribute("accept")
        state = _upload(browser, plain)
        assert state == "done", browser.find_element(By.ID, "status").text
        for plane in ("sagittal", "coronal", "axial"):
            canvas = browser.find_element(By.ID, f"view-{plane}")
            assert canvas.is_displayed() and int(canvas.get_attribute("data-overlay-pixels")) > 0, plane
        rows = browser.find_elements(By.CSS_SELECTOR, "#volumes tbody tr")
        shown = {
            r.find_elements(By.TAG_NAME, "td")[1].text: float(r.find_elements(By.TAG_NAME, "td")[2].text) for r in rows
        }
        assert shown["grey matter"] > 0 and shown["white matter"] > 0
        ood = browser.find_element(By.ID, "ood")
        assert ood.is_displayed() and ood.get_attribute("class") == "ok", ood.text

        assert _upload(browser, curved) == "done", browser.find_element(By.ID, "status").text
        ood = browser.find_element(By.ID, "ood")
        assert ood.is_displayed() and ood.get_attribute("class") == "warning"
        assert ood.text.startswith("Warning: this scan's intensities are unlike every training site")
        browser.save_screenshot(str(tmp_path / "web-ui-dicom-ood.png"))
        if os.environ.get("FEDMRI_SAVE_SCREENSHOT"):
            shutil.copy(
                tmp_path / "web-ui-dicom-ood.png", Path(__file__).resolve().parents[3] / "docs" / "web-ui-dicom-ood.png"
            )

        # A zip with two series: the page shows the service's reason.
        other = make_mr_series(np.ones((8, 8, 3), np.float32), np.diag([2.0, 2, 2, 1]))
        mixed = tmp_path / "mixed.zip"
        series_to_zip(make_mr_series(volume[:, :, :10], img.affine) + other, mixed)
        assert _upload(browser, mixed) == "error"
        status = browser.find_element(By.ID, "status").text
        assert "422" in status and "2 series mixed" in status
    finally:
        browser.quit()
