"""The web page's NiiVue viewer in headless Chromium (WebGL2 through its software renderer, SwiftShader).

Uploads a NIfTI file: NiiVue shows the volume with the returned label map as a translucent overlay
(two volumes, three planes), the legend lists label colours and volumes, the OOD check is visible;
a gamma-curved scan gets the warning. Without WebGL2 the page falls back to the server's slices.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from shared.ood import _in_signal_range, build_record, site_reference_from_dir, write_ood
from shared.scanner import ScannerProfile

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[3]
BUNDLE = REPO / "server" / "api" / "static" / "vendor" / "niivue.umd.js"
# SwiftShader WebGL2 (see the notes on headless Chromium): the flags that give a WebGL2 context here.
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
    "--disable-quic",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--window-size=1280,1400",
)

# Pixels of the viewer's WebGL canvas: all, non-black, and coloured (not grey), read right after a redraw.
READ_CANVAS = """
const nv = window.fedmriViewer; nv.drawScene();
const gl = nv.gl, w = gl.drawingBufferWidth, h = gl.drawingBufferHeight, px = new Uint8Array(w * h * 4);
gl.readPixels(0, 0, w, h, gl.RGBA, gl.UNSIGNED_BYTE, px);
let lit = 0, coloured = 0;
for (let i = 0; i < px.length; i += 4) {
  const r = px[i], g = px[i + 1], b = px[i + 2];
  if (r + g + b > 30) lit++;
  if (Math.max(r, g, b) - Math.min(r, g, b) > 40) coloured++;
}
return [w * h, lit, coloured];
"""


@pytest.fixture(scope="module")
def api_registry(api_registry, tiny_data_dir, tmp_path_factory):
    """The session registry, copied, with an OOD reference from the tiny sites (the live server serves this one)."""
    registry = tmp_path_factory.mktemp("viewer-registry") / "registry"
    shutil.copytree(api_registry, registry)
    sites = {p.name: site_reference_from_dir(p) for p in sorted(tiny_data_dir.iterdir()) if p.is_dir()}
    write_ood(registry, "tiny", build_record(sites))
    return registry


def _upload(browser, path: Path) -> str:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.find_element(By.ID, "file").send_keys(str(path))
    browser.find_element(By.ID, "submit").click()
    WebDriverWait(browser, 240).until(
        lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("done", "error")
    )
    return browser.find_element(By.TAG_NAME, "body").get_attribute("data-state")


def _legend(browser) -> dict[str, tuple[str, float]]:
    from selenium.webdriver.common.by import By

    shown = {}
    for row in browser.find_elements(By.CSS_SELECTOR, "#volumes tbody tr"):
        cells = row.find_elements(By.TAG_NAME, "td")
        colour = cells[0].find_element(By.CLASS_NAME, "swatch").value_of_css_property("background-color")
        shown[cells[1].text] = (colour, float(cells[2].text))
    return shown


def test_niivue_viewer_shows_the_overlay_in_three_planes(chromium, live_server, site_case, tmp_path):
    from selenium.webdriver.common.by import By

    if not BUNDLE.is_file():
        pytest.skip("NiiVue not vendored: run scripts/vendor-niivue.sh (needs npm at install time)")
    upload = tmp_path / "site_b_ts000.nii.gz"  # a neutral name: the screenshot goes into the README
    shutil.copy(site_case[0], upload)
    img = nib.load(site_case[0])
    curved = tmp_path / "site_b_ts000_gamma.nii.gz"  # the same brain through a strong gamma curve
    volume = np.asarray(img.dataobj, dtype=np.float32)
    nib.save(nib.Nifti1Image(_in_signal_range(volume, ScannerProfile(gamma=0.3), None), img.affine), curved)

    browser = chromium(CHROMIUM_FLAGS)
    try:
        browser.get(live_server["url"] + "/")
        assert browser.execute_script("return !!document.createElement('canvas').getContext('webgl2')"), (
            "no WebGL2 in headless Chromium with SwiftShader"
        )
        assert _upload(browser, upload) == "done", browser.find_element(By.ID, "status").text
        body = browser.find_element(By.TAG_NAME, "body")
        assert body.get_attribute("data-viewer") == "niivue", body.get_attribute("data-viewer-reason")
        assert browser.find_element(By.ID, "niivue").is_displayed()
        volumes = browser.execute_script(
            "return window.fedmriViewer.volumes.map(v => [v.name, Array.from(v.hdr.dims.slice(1, 4)), v.opacity])"
        )
        assert [v[0] for v in volumes] == ["upload.nii.gz", "segmentation.nii.gz"]  # no patient file name
        assert volumes[0][1] == volumes[1][1] == list(img.shape[:3]) and 0 < volumes[1][2] < 1
        assert browser.execute_script("return window.fedmriViewer.opts.sliceType") == 3  # multiplanar

        total, lit, coloured = browser.execute_script(READ_CANVAS)
        assert lit > 0.02 * total, "the viewer's canvas is blank"
        browser.execute_script("window.fedmriViewer.setOpacity(1, 0)")
        _, _, coloured_without = browser.execute_script(READ_CANVAS)
        browser.execute_script("window.fedmriViewer.setOpacity(1, 0.5)")
        assert coloured > coloured_without + 500, (coloured, coloured_without)  # the overlay is drawn

        # Scrolling: the layout buttons switch to one plane, and moving the crosshair changes the slice.
        browser.find_element(By.CSS_SELECTOR, "#viewer [data-slice=axial]").click()
        assert browser.execute_script("return window.fedmriViewer.opts.sliceType") == 0
        before = browser.execute_script("return Array.from(window.fedmriViewer.scene.crosshairPos)")
        browser.execute_script("window.fedmriViewer.moveCrosshairInVox(0, 0, 3)")
        after = browser.execute_script("return Array.from(window.fedmriViewer.scene.crosshairPos)")
        assert after != before
        browser.find_element(By.CSS_SELECTOR, "#viewer [data-slice=multiplanar]").click()

        legend = _legend(browser)
        assert legend["grey matter"][1] > 0 and legend["white matter"][1] > 0
        assert legend["grey matter"][0] != legend["white matter"][0]
        ood = browser.find_element(By.ID, "ood")
        assert ood.is_displayed() and ood.get_attribute("class") == "ok", ood.text

        # A second upload replaces both volumes (still two), and the OOD warning shows above the viewer.
        assert _upload(browser, curved) == "done", browser.find_element(By.ID, "status").text
        assert browser.execute_script("return window.fedmriViewer.volumes.length") == 2
        ood = browser.find_element(By.ID, "ood")
        assert ood.is_displayed() and ood.get_attribute("class") == "warning", ood.text
        browser.execute_script("window.scrollTo(0, 0)")
        browser.save_screenshot(str(tmp_path / "web-ui.png"))
        if os.environ.get("FEDMRI_SAVE_SCREENSHOT"):  # refresh the README's picture on request only
            shutil.copy(tmp_path / "web-ui.png", REPO / "docs" / "web-ui.png")
    finally:
        browser.quit()


def test_without_webgl2_the_page_shows_server_slices(chromium, live_server, site_case, tmp_path):
    """No WebGL2 (old browser, GPU blocklisted): same upload, the server-rendered slices are the view."""
    from selenium.webdriver.common.by import By

    browser = chromium(CHROMIUM_FLAGS)
    try:
        browser.execute_cdp_cmd(
            "Page.addScriptToEvaluateOnNewDocument",
            {
                "source": """
            const getContext = HTMLCanvasElement.prototype.getContext;
            HTMLCanvasElement.prototype.getContext = function (kind, ...rest) {
              return kind === 'webgl2' ? null : getContext.call(this, kind, ...rest);
            };"""
            },
        )
        browser.get(live_server["url"] + "/")
        assert _upload(browser, site_case[0]) == "done", browser.find_element(By.ID, "status").text
        body = browser.find_element(By.TAG_NAME, "body")
        assert body.get_attribute("data-viewer") == "slices"
        if BUNDLE.is_file():
            assert "WebGL2" in body.get_attribute("data-viewer-reason")
        assert not browser.find_element(By.ID, "viewer").is_displayed()
        for plane in ("sagittal", "coronal", "axial"):
            canvas = browser.find_element(By.ID, f"view-{plane}")
            assert canvas.is_displayed() and int(canvas.get_attribute("data-overlay-pixels")) > 0, plane
        assert _legend(browser)["grey matter"][1] > 0
    finally:
        browser.quit()
