"""``armdi build`` and ``armdi inspect``: exit status 0 on success; for each bad input exactly
one ``error: ...`` line on stderr, exit status 1 and no traceback.

Most cases drive ``appliance.cli.main`` in-process (what the console script calls); one runs
the installed ``armdi`` script in a subprocess to check the real entry point end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.cli import main
from tests.conftest import RESIDUAL_CUTS, BuiltModel

ARMDI = Path(sys.executable).parent / "armdi"
K = len(RESIDUAL_CUTS) - 1


def _run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
         *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["armdi", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out, err = capsys.readouterr()
    code = exit_info.value.code
    return (code if isinstance(code, int) else 1 if code else 0), out, err


def _assert_one_error(code: int, err: str, *fragments: str) -> str:
    assert code == 1, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def test_build_and_inspect(tiny_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture[str]) -> None:
    repo = tmp_path / "repo"
    code, out, err = _run(monkeypatch, capsys, "build", str(tiny_onnx), "--repo", str(repo),
                          "--segments", "window:2", "--backend", "ort")
    assert code == 0, err
    assert f"built tiny: {K} blocks, {2 * K - 1} segment engines (ort: {2 * K - 1})" in out
    assert "error" not in err

    code, out, err = _run(monkeypatch, capsys, "inspect", "tiny", "--json", "--repo", str(repo))
    assert code == 0, err
    data = json.loads(out)
    assert {"model_id", "fingerprint", "blocks", "cut_points", "segments", "verification",
            "profiles"} <= set(data)
    assert data["model_id"] == "tiny" and len(data["fingerprint"]) == 64
    assert isinstance(data["blocks"], int) and data["blocks"] == K
    assert isinstance(data["cut_points"], list) and len(data["cut_points"]) == K + 1
    assert [c["tensor"] for c in data["cut_points"]] == list(RESIDUAL_CUTS)
    assert data["cut_points"][0] == {"index": 0, "tensor": "input", "shape": [-1, 3, 8, 8],
                                     "dtype": "float32", "bytes": 768}
    assert data["segments"] == {"ort": 2 * K - 1}
    assert data["verification"]["passed"] is True
    assert 0 <= data["verification"]["max_abs_error"] <= 1e-5
    (profile,) = data["profiles"].values()
    assert len(profile["block_ms"]) == K and profile["full_model_ms"] > 0

    code, out, err = _run(monkeypatch, capsys, "inspect", "tiny", "--repo", str(repo))
    assert code == 0 and "verification: passed" in out and "r1_add" in out

    code, out, err = _run(monkeypatch, capsys, "build", str(tiny_onnx), "--repo", str(repo),
                          "--if-missing")
    assert code == 0 and "tiny is already built" in out


def test_name_option(tiny_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                     capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(monkeypatch, capsys, "build", str(tiny_onnx), "--repo",
                          str(tmp_path / "repo"), "--segments", "blocks", "--name", "edge-net",
                          "--backend", "ort")
    assert code == 0, err
    assert "built edge-net:" in out and (tmp_path / "repo" / "edge-net" / "manifest.json").is_file()


def test_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                      capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(monkeypatch, capsys, "build", str(tmp_path / "nope.onnx"), "--repo",
                        str(tmp_path / "repo"))
    _assert_one_error(code, err, "nope.onnx: no such ONNX file")


def test_corrupt_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                      capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\x01\x02 this is not a model")
    code, _, err = _run(monkeypatch, capsys, "build", str(bad), "--repo", str(tmp_path / "repo"))
    _assert_one_error(code, err, "bad.onnx: not a valid ONNX model")


def test_two_input_model(two_input_onnx: Path, tmp_path: Path,
                         monkeypatch: pytest.MonkeyPatch,
                         capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(monkeypatch, capsys, "build", str(two_input_onnx), "--repo",
                        str(tmp_path / "repo"))
    _assert_one_error(code, err, "exactly one input tensor, found 2")


def test_unknown_model_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(monkeypatch, capsys, "build", "alexnet", "--repo",
                        str(tmp_path / "repo"))
    _assert_one_error(code, err, "unknown model 'alexnet'", "mobilenet_v2")


def test_unwritable_repository(tiny_onnx: Path, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "x" / "file"
    blocker.parent.mkdir()
    blocker.write_text("")
    code, _, err = _run(monkeypatch, capsys, "build", str(tiny_onnx), "--repo",
                        str(blocker / "repo"))
    _assert_one_error(code, err, "not writable", "--repo")


def test_bad_segments_option(tiny_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(monkeypatch, capsys, "build", str(tiny_onnx), "--repo",
                        str(tmp_path / "repo"), "--segments", "window:0")
    _assert_one_error(code, err, "--segments 'window:0'")


@pytest.mark.parametrize(("value", "fragment"), [
    ("lots", "--max-memory 'lots': give a size such as 2G"),
    ("16M", "over --max-memory 16 MB"),  # below the process's own size: stops cleanly
])
def test_max_memory_option(tiny_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture[str], value: str, fragment: str) -> None:
    code, _, err = _run(monkeypatch, capsys, "build", str(tiny_onnx), "--repo",
                        str(tmp_path / "repo"), "--backend", "ort", "--max-memory", value)
    _assert_one_error(code, err, fragment)


def test_inspect_unknown_model(built_tiny: BuiltModel, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(monkeypatch, capsys, "inspect", "resnet18", "--json", "--repo",
                        str(built_tiny.repo))
    _assert_one_error(code, err, "'resnet18' is not in the repository", "armdi build resnet18")


def test_inspect_damaged_manifest(built_tiny: BuiltModel, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    (built_tiny.model_dir / "manifest.json").write_text("{")
    code, _, err = _run(monkeypatch, capsys, "inspect", "tiny", "--repo", str(built_tiny.repo))
    _assert_one_error(code, err, "unreadable manifest", "rebuild")


def test_installed_script(tiny_onnx: Path, tmp_path: Path) -> None:
    """The console script itself: one good build, one bad input."""
    repo = tmp_path / "repo"
    ok = subprocess.run([str(ARMDI), "build", str(tiny_onnx), "--repo", str(repo),
                         "--segments", "blocks", "--backend", "ort"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "built tiny:" in ok.stdout
    bad = subprocess.run([str(ARMDI), "build", str(tmp_path / "missing.onnx"), "--repo",
                          str(repo)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing.onnx'}: no such "
                                               "ONNX file"]


def test_up_builds_again_a_named_model_built_by_an_older_armdi(
        built_tiny: BuiltModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import shutil
    import signal

    import appliance.cli as cli
    from engines.errors import ArmdiError

    repo = tmp_path / "repo"
    shutil.copytree(built_tiny.model_dir, repo / "mobilenet_v2")
    manifest = repo / "mobilenet_v2" / "manifest.json"
    data = json.loads(manifest.read_text())
    data.update(schema_version=1, model_id="mobilenet_v2")  # an armdi before fingerprints v2
    manifest.write_text(json.dumps(data))
    builds: list[dict[str, object]] = []

    def build(**kwargs: object) -> None:
        builds.append(kwargs)
        raise ArmdiError("stopped after the build decision")

    monkeypatch.setattr(cli, "build", build)
    handler = signal.getsignal(signal.SIGTERM)
    try:
        code, out, err = _run(monkeypatch, capsys, "up", "--model", "mobilenet_v2", "--repo",
                              str(repo), "--nodes", "0")
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert builds == [{"model": "mobilenet_v2", "repo": repo}]
    assert "mobilenet_v2 in" in out and "schema version 1" in out and "building it again" in out
    assert code == 1 and "stopped after the build decision" in err
