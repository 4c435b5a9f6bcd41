"""Fixtures of the front-end tests: a ``FakePipeline`` and a ``TestClient`` of the app over it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from tests.web import FakePipeline
from web.app import create_app


@pytest.fixture
def fake() -> FakePipeline:
    return FakePipeline()


@pytest.fixture
def client(fake: FakePipeline) -> Iterator[TestClient]:
    with TestClient(create_app(fake)) as test_client:
        yield test_client
