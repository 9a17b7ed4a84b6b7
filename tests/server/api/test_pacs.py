"""PACS round trip against a real Orthanc with its DICOMweb plugin: `fedmri pacs` and POST /v1/pacs/segment.

Orthanc runs on 127.0.0.1 with a throwaway storage folder and config, and is stopped after
the module. Debian's ``orthanc`` and ``orthanc-dicomweb`` are installed when missing and the
tests run as root with apt-get; otherwise the module is skipped with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import highdicom as hd
import httpx
import nibabel as nib
import numpy as np
import pytest

from shared.dicom import make_mr_series, series_to_zip

pytestmark = pytest.mark.slow

PLUGIN_DIRS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc"))
REPO = Path(__file__).resolve().parents[3]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _plugin() -> Path | None:
    for folder in PLUGIN_DIRS:
        found = sorted(folder.glob("libOrthancDicomWeb.so*")) if folder.is_dir() else []
        if found:
            return found[0]
    return None


def _install_orthanc() -> str | None:
    """Orthanc's binary path, installing the Debian packages if needed and possible; None to skip."""
    if shutil.which("Orthanc") and _plugin():
        return shutil.which("Orthanc")
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "orthanc", "orthanc-dicomweb"]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
        subprocess.run(install, env=env, capture_output=True)
    return shutil.which("Orthanc") if _plugin() else None


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """A throwaway Orthanc on 127.0.0.1; yields its DICOMweb root URL."""
    binary = _install_orthanc()
    if binary is None:
        pytest.skip(
            "Orthanc with its DICOMweb plugin is not installed and cannot be (needs root and apt-get: "
            "apt-get install orthanc orthanc-dicomweb)"
        )
    work = tmp_path_factory.mktemp("orthanc")
    http_port, dicom_port = _free_port(), _free_port()
    config = {
        "Name": "fedmri-test",
        "StorageDirectory": str(work / "db"),
        "IndexDirectory": str(work / "db"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "HttpBindAddress": "127.0.0.1",
        "DicomServerEnabled": False,
        "Plugins": [str(_plugin())],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (work / "orthanc.json").write_text(json.dumps(config))
    log = (work / "orthanc.log").open("w")
    proc = subprocess.Popen([binary, str(work / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT, cwd=work)
    base = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"Orthanc exited with {proc.returncode}:\n{(work / 'orthanc.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{base}/system", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"Orthanc not answering after 30 s:\n{(work / 'orthanc.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield f"{base}/dicom-web"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _stow(url: str, datasets) -> None:
    from server.pacs import dicomweb_client

    dicomweb_client(url).store_instances(datasets)


def _seg_series(url: str, study: str) -> list[dict]:
    from server.pacs import dicomweb_client

    found = dicomweb_client(url).search_for_series(study_instance_uid=study)
    return [s for s in found if s["00080060"]["Value"][0] == "SEG"]


@pytest.fixture(scope="module")
def mni_series(site_case):
    """A synthetic MR series made with pydicom from an MNI152-derived subject (site-b's test case, scanner 4x - 300)."""
    img = nib.load(site_case[0])
    return make_mr_series(
        np.asarray(img.dataobj, dtype=np.float32), img.affine, patient_name="Synthetic^Pacs", patient_id="PACS-1"
    )


def test_cli_round_trip_stores_a_seg_that_matches_the_upload_answer(
    orthanc, mni_series, api_registry, client, tmp_path
):
    _stow(orthanc, mni_series)
    study, series = mni_series[0].StudyInstanceUID, mni_series[0].SeriesInstanceUID
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDMRI_")}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "server.cli",
            "pacs",
            "--url",
            orthanc,
            "--study",
            study,
            "--registry",
            str(api_registry),
            "--json",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["series_uid"] == series and result["instances"] == len(mni_series)
    assert "Synthetic" not in done.stderr and "PACS-1" not in done.stderr  # nothing from the headers is logged

    # Orthanc now has the SEG in the study, referencing the source series.
    segs = _seg_series(orthanc, study)
    assert [s["0020000E"]["Value"][0] for s in segs] == [result["seg_series_uid"]]
    from server.pacs import dicomweb_client

    stored = dicomweb_client(orthanc).retrieve_series(study, result["seg_series_uid"])
    assert len(stored) == 1
    seg = hd.seg.Segmentation.from_dataset(stored[0])
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series

    # Voxel by voxel the same as POST /v1/segment's NIfTI answer for the same series as a zip.
    response = client.post("/v1/segment", files={"file": ("s.zip", series_to_zip(mni_series))})
    assert response.status_code == 200, response.text
    import gzip

    nifti = nib.Nifti1Image.from_bytes(gzip.decompress(response.content))
    labels = np.asarray(nifti.dataobj)
    uids = [ds.SOPInstanceUID for ds in mni_series]
    frames = seg.get_pixels_by_source_instance(uids, combine_segments=True, relabel=False)
    for k in range(len(uids)):  # make_mr_series: slice k is voxel plane k
        np.testing.assert_array_equal(frames[k], labels[:, :, k].T)


def test_api_round_trip_and_its_errors(orthanc, mni_series, make_client, monkeypatch):
    study, series = mni_series[0].StudyInstanceUID, mni_series[0].SeriesInstanceUID
    _stow(orthanc, mni_series)  # idempotent when the first test already stored it
    before = len(_seg_series(orthanc, study))

    monkeypatch.delenv("FEDMRI_PACS_URL", raising=False)
    response = make_client().post("/v1/pacs/segment", json={"study": study})
    assert response.status_code == 503 and "FEDMRI_PACS_URL" in response.json()["detail"]

    monkeypatch.setenv("FEDMRI_PACS_URL", orthanc)
    client = make_client()
    response = client.post("/v1/pacs/segment", json={"study": study, "series": series})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["series"] == series and body["instances"] == len(mni_series)
    assert {row["name"] for row in body["labels"]} == {"grey matter", "white matter", "lesion"}
    assert len(_seg_series(orthanc, study)) == before + 1

    # A second MR series in the study: the caller must choose.
    other = make_mr_series(np.ones((16, 16, 4), np.float32) * 100, np.diag([2.0, 2, 2, 1]), study_uid=study)
    _stow(orthanc, other)
    response = client.post("/v1/pacs/segment", json={"study": study})
    assert response.status_code == 404 and "the study has 2 MR series; choose one" in response.json()["detail"]
    response = client.post("/v1/pacs/segment", json={"study": "1.2.3.4.5"})
    assert response.status_code == 404, response.text
    response = client.post("/v1/pacs/segment", json={"study": "not a uid"})
    assert response.status_code == 422


def test_unreachable_pacs_is_a_502(make_client, monkeypatch):
    monkeypatch.setenv("FEDMRI_PACS_URL", f"http://127.0.0.1:{_free_port()}/dicom-web")
    monkeypatch.setenv("FEDMRI_PACS_TIMEOUT_S", "5")
    response = make_client().post("/v1/pacs/segment", json={"study": "1.2.3"})
    assert response.status_code == 502
    assert response.json()["detail"].startswith("PACS unreachable during the series search")
