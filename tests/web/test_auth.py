"""Bearer-token authentication (``web.auth``): what is refused, what stays open, the page's
session cookie for its event stream, and the CLI's reading of the token."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from appliance.cli import api_token
from engines.errors import ArmdiError
from tests.web import MODEL_ID, FakePipeline
from web.app import WebSettings, create_app
from web.auth import SESSION_COOKIE, session_value
from web.server import exposure_warning, listen

TOKEN = "s3cret-token"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
PROTECTED = ["/v1/pipeline", "/v1/model", "/v1/events", "/metrics", "/v2",
             f"/v2/models/{MODEL_ID}", f"/v2/models/{MODEL_ID}/ready", "/docs", "/openapi.json"]


@pytest.fixture
def client() -> Iterator[TestClient]:
    fake = FakePipeline()
    with TestClient(create_app(fake, settings=WebSettings(api_token=TOKEN))) as test_client:
        yield test_client


@pytest.mark.parametrize("path", PROTECTED)
def test_everything_else_needs_the_token(client: TestClient, path: str) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                    {"Authorization": f"Basic {TOKEN}"}):
        response = client.get(path, headers=headers)
        assert response.status_code == 401, (path, headers)
        assert response.headers["www-authenticate"].startswith("Bearer")
        key = "error" if path.startswith("/v2") else "detail"
        assert set(response.json()) == {key}
    assert client.get(path, headers=BEARER).status_code == 200, path


def test_posts_need_the_token_before_the_body_is_read(client: TestClient) -> None:
    response = client.post("/v1/classify", files={"file": ("x.png", b"\x89PNG\r\n\x1a\n")})
    assert response.status_code == 401
    response = client.post(f"/v2/models/{MODEL_ID}/infer", json={"inputs": []})
    assert response.status_code == 401
    assert set(response.json()) == {"error"}
    assert client.app.state.pipeline.calls == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize("path", ["/v2/health/live", "/v2/health/ready", "/",
                                  "/static/app.js", "/static/vendor/uplot-1.6.32.min.js"])
def test_health_and_the_page_stay_open(client: TestClient, path: str) -> None:
    assert client.get(path).status_code == 200


def test_the_session_cookie_opens_reads_only(client: TestClient) -> None:
    assert client.post("/v1/session").status_code == 401
    response = client.post("/v1/session", headers=BEARER)
    assert response.status_code == 204
    cookie = response.headers["set-cookie"]
    assert f"{SESSION_COOKIE}={session_value(TOKEN)}" in cookie
    assert TOKEN not in cookie  # derived from the token, not the token
    lowered = cookie.lower()
    assert "httponly" in lowered and "samesite=strict" in lowered and "path=/" in lowered
    # the test client now sends the cookie: reads work, writes still need the header
    assert client.get("/v1/pipeline").status_code == 200
    with client.stream("GET", "/v1/events") as stream:
        assert stream.status_code == 200
    assert client.post(f"/v2/models/{MODEL_ID}/infer", json={}).status_code == 401
    assert client.post("/v1/session").status_code == 401
    client.cookies.set(SESSION_COOKIE, "forged")
    assert client.get("/v1/pipeline").status_code == 401
    client.cookies.set(SESSION_COOKIE, session_value(TOKEN))
    assert client.delete("/v1/session", headers=BEARER).status_code == 204


def test_no_token_no_authentication() -> None:
    with TestClient(create_app(FakePipeline())) as client:
        for path in PROTECTED:
            assert client.get(path).status_code == 200, path
        assert client.post("/v1/session").status_code == 204


def test_an_empty_token_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        WebSettings(api_token="  ")
    assert TOKEN not in repr(WebSettings(api_token=TOKEN))


def test_the_cli_reads_the_token_from_a_file_or_the_environment(tmp_path: Path) -> None:
    assert api_token(None, environ={}) is None
    assert api_token(None, environ={"ARMDI_API_TOKEN": " abc \n"}) == "abc"
    with pytest.raises(ArmdiError, match="ARMDI_API_TOKEN is set but empty"):
        api_token(None, environ={"ARMDI_API_TOKEN": ""})
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    assert api_token(token_file, environ={"ARMDI_API_TOKEN": "abc"}) == "from-file"
    token_file.write_text("\n")
    with pytest.raises(ArmdiError, match="is empty"):
        api_token(token_file, environ={})
    with pytest.raises(ArmdiError, match="cannot read --api-token-file"):
        api_token(tmp_path / "missing", environ={})


def test_warns_when_reachable_from_elsewhere_without_a_token() -> None:
    loopback = listen("127.0.0.1", 0)
    anywhere = listen("0.0.0.0", 0)
    try:
        assert exposure_warning(loopback, None) is None
        assert exposure_warning(anywhere, TOKEN) is None
        warning = exposure_warning(anywhere, None)
        assert warning is not None and "ARMDI_API_TOKEN" in warning
    finally:
        loopback.close()
        anywhere.close()
