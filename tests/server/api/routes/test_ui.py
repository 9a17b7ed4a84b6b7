"""The web page and the OpenAPI docs are served, self-contained (nothing from the internet)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[4]


def test_page_and_assets(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="upload-form"' in page.text and 'type="file"' in page.text
    for asset in re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text):
        assert client.get(asset).status_code == 200, asset
    script = client.get("/static/app.js").text
    assert "/v1/segment/summary" in script and "X-API-Key" in script
    for text in (page.text, script, client.get("/static/style.css").text):
        assert not re.search(r"(?:src|href|url)\s*[=(]\s*[\"']?(?:https?:)?//", text), "no remote resources"


def test_viewer_is_vendored_not_fetched(client):
    """NiiVue comes from this server (scripts/vendor-niivue.sh pins it); the page falls back without it."""
    script = client.get("/static/app.js").text
    assert '"/static/vendor/niivue.umd.js"' in script and 'getContext("webgl2")' in script
    assert 'id="niivue"' in client.get("/").text
    vendor = (REPO / "scripts" / "vendor-niivue.sh").read_text()
    version = re.search(r"^VERSION=(\d+\.\d+\.\d+)$", vendor, re.M)
    sha = re.search(r"^SHA256=([0-9a-f]{64})\b", vendor, re.M)
    assert version and sha, "the vendored NiiVue is pinned by version and checksum"
    bundle = REPO / "server" / "api" / "static" / "vendor" / "niivue.umd.js"
    if not bundle.is_file():
        pytest.skip("NiiVue not vendored here (scripts/vendor-niivue.sh needs npm at install time)")
    assert hashlib.sha256(bundle.read_bytes()).hexdigest() == sha.group(1), "stale bundle: rerun the script"
    served = client.get("/static/vendor/niivue.umd.js")
    assert served.status_code == 200 and "javascript" in served.headers["content-type"]
    assert len(served.content) == bundle.stat().st_size and b"Niivue" in served.content


def test_openapi_documents_the_upload(client):
    spec = client.get("/openapi.json").json()
    assert {"/v1/segment", "/v1/segment/summary", "/v1/models", "/healthz", "/readyz"} <= set(spec["paths"])
    body = spec["paths"]["/v1/segment"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["required"] == ["file"] and body["properties"]["file"]["format"] == "binary"
    assert "application/gzip" in spec["paths"]["/v1/segment"]["post"]["responses"]["200"]["content"]


def test_docs_work_offline(client):
    """Swagger UI comes from the installed wheel, not a CDN: every asset the page names is served here."""
    page = client.get("/docs")
    assert page.status_code == 200
    assets = re.findall(r"(?:src|href)=[\"']([^\"']+)", page.text)
    assert assets and not [a for a in assets if "//" in a], f"remote assets in /docs: {assets}"
    for asset in assets:
        response = client.get(asset)
        assert response.status_code == 200 and len(response.content) > 100, asset
    assert "/openapi.json" in page.text
