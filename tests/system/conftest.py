"""Real multi-process clusters on loopback (ipc:// sockets in a temp dir)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest

from appliance.api import InferenceResult, QueueFullError
from appliance.cluster import LocalClusterOptions, running
from appliance.data.source import Source
from appliance.settings import source_settings
from tests.conftest import BuiltModel


@pytest.fixture(scope="session")
def lite_repo(tmp_path_factory: pytest.TempPathFactory) -> BuiltModel:
    """efficientnet_lite0 with its real weights, merged to 12 blocks (block engines only)."""
    from builder.build import BuildOptions, build

    root = tmp_path_factory.mktemp("lite")
    report = build(BuildOptions(model="efficientnet_lite0", repo=root / "repo",
                                segments="blocks", max_blocks=12, profile_repeats=5,
                                profile_segments=0))
    return BuiltModel(root / "repo", report.manifest, report.path / "model.onnx")


@contextlib.contextmanager
def cluster(repo: Path, model: str, tmp: Path, **options: object) -> Iterator[Source]:
    """Worker processes plus an in-process source; everything stopped on exit."""
    opts = LocalClusterOptions(model=model, repo=repo, run_dir=tmp / "run", port=0,
                               **options)  # type: ignore[arg-type]
    with running(opts) as (_cluster, config):
        source = Source(source_settings(config))
        try:
            source.start()
            yield source
        finally:
            source.close()


def submit_all(source: Source, inputs: np.ndarray,
               timeout_s: float = 60.0) -> list[Future[InferenceResult]]:
    """Submit every input, waiting (not failing) whenever the source pushes back."""
    futures: list[Future[InferenceResult]] = []
    deadline = time.monotonic() + timeout_s
    for x in inputs:
        while True:
            try:
                futures.append(source.submit(x[None]))
                break
            except QueueFullError:
                assert time.monotonic() < deadline, "the source never accepted more work"
                time.sleep(0.005)
    return futures
