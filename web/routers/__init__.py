"""The routers, one per resource, and what they share.

``web.app.create_app`` puts the pipeline and the settings on ``app.state``; handlers get them
through the ``PipelineDep`` and ``SettingsDep`` dependencies and never import the runtime.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Annotated, Any

from fastapi import Depends, Request

from appliance.api import Pipeline

MIB = 1024 * 1024


@dataclass(frozen=True)
class WebSettings:
    """Limits of the HTTP front end, fixed when the app is built."""

    # Largest image /v1/classify accepts (413 above it).
    max_image_bytes: int = 20 * MIB
    # Largest request body of any endpoint, checked while it streams in (413 above it).
    # Holds a batch of 16 ImageNet-sized FP32 tensors as JSON text, 100 as binary data.
    max_body_bytes: int = 64 * MIB
    # A comment line is sent on /v1/events this often, so proxies keep the stream open.
    events_keepalive_s: float = 15.0
    # Bearer token every request needs, except /v2/health/* and the page's own files
    # (``web.auth``). None: no authentication (bind to localhost then).
    api_token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.api_token is not None and not self.api_token.strip():
            raise ValueError("the API token is empty")


# Dependencies are ``async``: FastAPI runs a plain ``def`` dependency in a worker thread, two
# thread hops per request for nothing.
async def get_pipeline(request: Request) -> Pipeline:
    pipeline: Pipeline = request.app.state.pipeline
    return pipeline


async def get_settings(request: Request) -> WebSettings:
    settings: WebSettings = request.app.state.settings
    return settings


PipelineDep = Annotated[Pipeline, Depends(get_pipeline)]
SettingsDep = Annotated[WebSettings, Depends(get_settings)]


@lru_cache(maxsize=1)
def server_version() -> str:
    """The installed armdi version (what /v2 reports)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("armdi")
    except PackageNotFoundError:
        return "0+unknown"


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities replaced by ``None`` (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value
