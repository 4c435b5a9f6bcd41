"""The ``armdi classify`` client: post image files to a running server's ``/v1/classify``.

Every failure is a ``ClassifyError`` whose message says what to do: no server at the URL, a
file that cannot be read, or the server's own ``detail``. A 503 with ``Retry-After``
(back-pressure) is retried a few times before giving up.
"""

from __future__ import annotations

import mimetypes
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from engines.errors import ArmdiError

DEFAULT_URL = "http://127.0.0.1:8000"
MAX_RETRY_WAIT_S = 5.0


class ClassifyError(ArmdiError):
    """A file could not be classified: no server, unreadable file, or an error answer."""


def normalize_url(url: str) -> str:
    """``host:port`` -> ``http://host:port``, without a trailing slash."""
    url = url.strip()
    if "://" not in url:
        url = f"http://{url}"
    return url.rstrip("/")


def classify_files(paths: Sequence[str | Path], url: str = DEFAULT_URL, top_k: int = 5,
                   timeout: float = 30.0, *, retries: int = 2) -> list[dict[str, Any]]:
    """Classify each file in order; one ``Classification.to_dict()`` per file, plus ``"file"``.

    ``retries``: how many times a file is re-sent after a 503 that carries ``Retry-After``.
    """
    base = normalize_url(url)
    results: list[dict[str, Any]] = []
    with httpx.Client(base_url=base, timeout=timeout) as client:
        for path in map(Path, paths):
            results.append(_classify_one(client, base, path, top_k, timeout, retries))
    return results


def _classify_one(client: httpx.Client, base: str, path: Path, top_k: int, timeout: float,
                  retries: int) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ClassifyError(f"cannot read {path}: {exc.strerror or exc}") from exc
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    for attempt in range(retries + 1):
        response = _post(client, base, path, data, mime, top_k, timeout)
        wait = _retry_after(response)
        if wait is None or attempt == retries:
            break
        time.sleep(wait)
    if response.is_error:
        raise ClassifyError(f"{path}: {_describe(response)}")
    try:
        body: dict[str, Any] = response.json()
    except ValueError as exc:
        raise ClassifyError(f"{path}: the server at {base} answered something that is not "
                            "JSON; is it an armdi server?") from exc
    return {"file": str(path), **body}


def _post(client: httpx.Client, base: str, path: Path, data: bytes, mime: str, top_k: int,
          timeout: float) -> httpx.Response:
    try:
        return client.post("/v1/classify", params={"top_k": top_k},
                           files={"file": (path.name, data, mime)})
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise ClassifyError(f"no armdi server at {base}: start one with `armdi up`") from exc
    except httpx.TimeoutException as exc:
        raise ClassifyError(f"{path}: the server at {base} did not answer within "
                            f"{timeout:g} s") from exc
    except httpx.HTTPError as exc:
        raise ClassifyError(f"{path}: lost the connection to {base} ({exc})") from exc


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds to wait before re-sending, for a 503 that says when; else ``None``."""
    if response.status_code != 503:
        return None
    try:
        return min(float(response.headers["retry-after"]), MAX_RETRY_WAIT_S)
    except (KeyError, ValueError):
        return None


def _describe(response: httpx.Response) -> str:
    """``"server answered 400 Bad Request: <detail>"``."""
    try:
        body = response.json()
    except ValueError:
        body = None
    detail: Any = body.get("detail", body.get("error")) if isinstance(body, dict) else None
    if isinstance(detail, list):  # FastAPI's validation errors
        detail = "; ".join(str(item.get("msg", item)) if isinstance(item, dict) else str(item)
                           for item in detail)
    if detail is None:
        detail = response.text.strip()[:200] or "(no detail)"
    return f"server answered {response.status_code} {response.reason_phrase}: {detail}"


def set_slowdown(node: str, factor: float, url: str = DEFAULT_URL,
                 timeout: float = 10.0) -> dict[str, Any]:
    """``PUT /v1/nodes/{node}/slowdown``: change a node's emulated slowdown while it runs."""
    return _node_call("PUT", f"/v1/nodes/{node}/slowdown", {"factor": factor}, node, url,
                      timeout)


def inject_fault(node: str, action: str, seconds: float, url: str = DEFAULT_URL,
                 timeout: float = 10.0) -> dict[str, Any]:
    """``POST /v1/nodes/{node}/fault``: kill, pause, resume or cut a worker."""
    return _node_call("POST", f"/v1/nodes/{node}/fault",
                      {"action": action, "seconds": seconds}, node, url, timeout)


def _node_call(method: str, path: str, body: dict[str, Any], node: str, url: str,
               timeout: float) -> dict[str, Any]:
    base = normalize_url(url)
    try:
        response = httpx.request(method, f"{base}{path}", json=body, timeout=timeout)
    except httpx.TransportError as exc:
        raise ClassifyError(f"no armdi server at {base} ({exc}); start one with armdi up") \
            from exc
    if response.status_code != 200:
        try:
            detail = response.json()
            detail = detail.get("error") or detail.get("detail") or detail
        except ValueError:
            detail = response.text[:200]
        raise ClassifyError(f"{node}: HTTP {response.status_code}: {detail}")
    result: dict[str, Any] = response.json()
    return result
