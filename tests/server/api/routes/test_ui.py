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
    assert client.get("/docs").status_code == 200
