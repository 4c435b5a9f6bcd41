"""Emulated compute with measured segment times (``emulate_times``, scenario he of ``armdi
bench adaptive``): a node waits a listed range's measured time, the blocks' profiled sum for
any other, and a bad table is a clear error before the node serves."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from appliance.data.node import Node, NodeSettings, load_emulated_times
from appliance.wire import frames as fr
from engines.device import device_signature
from engines.errors import ArmdiError
from tests.conftest import BuiltModel


def _node(built: BuiltModel, tmp: Path, times: Path) -> Node:
    return Node(NodeSettings(name="w1", data_addr=f"ipc://{tmp}/w1.data",
                             control_addr=f"ipc://{tmp}/w1.ctl", repo=built.repo,
                             model_id="tiny", emulate=True, emulate_times=times))


def _timed(node: Node, built: BuiltModel, end: int) -> tuple[float, fr.Frame]:
    shape = (1, *built.manifest.input.shape[1:])
    frame = fr.Frame(kind=fr.FrameKind.ACTIVATION, request_id=1, attempt=1,
                     fingerprint=bytes.fromhex(built.manifest.fingerprint), start_block=0,
                     tensor=np.zeros(shape, np.float32))
    t0 = time.perf_counter()
    out = node.compute(frame, end)
    return time.perf_counter() - t0, out


def test_a_listed_range_waits_its_measured_time(built_tiny: BuiltModel, tmp_path: Path) -> None:
    blocks = built_tiny.manifest.blocks
    times = tmp_path / "times.json"
    times.write_text(json.dumps({f"0:{blocks}": 250.0}))
    node = _node(built_tiny, tmp_path, times)
    elapsed, out = _timed(node, built_tiny, blocks)
    assert elapsed >= 0.25
    assert out.kind == fr.FrameKind.RESULT and not out.tensor.any()  # zeros, the model's shape
    assert out.tensor.shape == (1, *built_tiny.manifest.output.shape[1:])
    profile = built_tiny.manifest.profile_for(device_signature(), "ort")
    assert profile is not None and profile.block_ms[0] < 50.0  # far below the listed 250
    elapsed, out = _timed(node, built_tiny, 1)  # not listed: the block's profiled time
    assert elapsed < 0.2 and out.start_block == 1


@pytest.mark.parametrize(("content", "error"), [
    ("not json", "cannot read it as JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"0-3": 1.0}', "'0-3' is not a range start:end of the model's 5 blocks"),
    ('{"3:3": 1.0}', "'3:3' is not a range"),
    ('{"0:6": 1.0}', "'0:6' is not a range"),
    ('{"0:2": -1}', "-1 is not a time in ms"),
    ('{"0:2": "fast"}', "'fast' is not a time in ms"),
    ('{"0:2": true}', "True is not a time in ms"),
])
def test_a_bad_table_is_a_clear_error(tmp_path: Path, content: str, error: str) -> None:
    path = tmp_path / "times.json"
    path.write_text(content)
    with pytest.raises(ArmdiError, match=error.replace("(", r"\(").replace("[", r"\[")):
        load_emulated_times(path, 5)


def test_a_missing_table_is_a_clear_error_and_a_good_one_loads(tmp_path: Path) -> None:
    with pytest.raises(ArmdiError, match="cannot read it as JSON"):
        load_emulated_times(tmp_path / "absent.json", 5)
    path = tmp_path / "ok.json"
    path.write_text(json.dumps({"0:2": 1.5, "2:5": 0}))
    assert load_emulated_times(path, 5) == {(0, 2): 1.5, (2, 5): 0.0}
