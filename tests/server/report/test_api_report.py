"""GET /v1/report through the real FastAPI app: built on first call, then served from the cache."""

from __future__ import annotations

from fastapi.testclient import TestClient

from server.api.config import ApiSettings
from server.api.main import create_app


def test_report_route_builds_then_caches(trained_registry, tiny_data_dir, tmp_path):
    settings = ApiSettings(registry_dir=trained_registry, data_dir=tiny_data_dir, reports_dir=tmp_path / "reports")
    with TestClient(create_app(settings)) as client:
        first = client.get("/v1/report", params={"format": "json"})
        assert first.status_code == 200, first.text
        assert first.headers["content-type"].startswith("application/json")
        assert first.headers["x-report-version"] == "tiny-instance"  # the served model
        assert first.headers["x-report-cached"] == "false"
        report = first.json()
        assert [s["site"] for s in report["sites"]] == ["site-a", "site-b", "site-c"]
        assert report["invariance"]["dice_min"] >= 0.999
        assert (tmp_path / "reports" / "tiny-instance" / "report.html").is_file()

        page = client.get("/v1/report")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert page.headers["x-report-cached"] == "true"
        assert all(site in page.text for site in ("site-a", "site-b", "site-c"))

        assert client.get("/v1/report", params={"format": "pdf"}).status_code == 422


def test_report_route_without_a_model_is_404(tiny_data_dir, tmp_path):
    settings = ApiSettings(registry_dir=tmp_path / "empty", data_dir=tiny_data_dir, reports_dir=tmp_path / "reports")
    with TestClient(create_app(settings)) as client:
        response = client.get("/v1/report")
    assert response.status_code == 404
    assert "no model registered" in response.json()["detail"]


def test_report_route_without_site_data_is_404(trained_registry, tmp_path):
    settings = ApiSettings(
        registry_dir=trained_registry, data_dir=tmp_path / "nodata", reports_dir=tmp_path / "reports"
    )
    with TestClient(create_app(settings)) as client:
        response = client.get("/v1/report", params={"format": "json"})
    assert response.status_code == 404
    assert "no site folders" in response.json()["detail"]
