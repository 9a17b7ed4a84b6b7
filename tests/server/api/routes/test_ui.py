"""The web page and the OpenAPI docs are served, self-contained (nothing from the internet)."""

from __future__ import annotations

import re


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
