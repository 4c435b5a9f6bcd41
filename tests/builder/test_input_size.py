"""``--input-size`` for ONNX files and named models, and options that only apply to named
models."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder.build import BuildOptions, build
from engines.errors import BuildError
from tests.conftest import residual_net, save


def _dynamic_hw(tmp_path: Path) -> Path:
    model = residual_net()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for dim, name in zip(dims[2:], ("H", "W"), strict=True):
        dim.Clear()
        dim.dim_param = name
    del model.graph.value_info[:]
    return save(model, tmp_path / "src" / "dyn.onnx")


def _build(source: Path, repo: Path, **options: object) -> object:
    opts: dict[str, object] = {"segments": "blocks", "backend": "ort", "profile_repeats": 2,
                               "profile_segments": 0, **options}
    return build(BuildOptions(model=str(source), repo=repo, **opts))  # type: ignore[arg-type]


def test_dynamic_height_and_width_need_input_size(tmp_path: Path) -> None:
    source = _dynamic_hw(tmp_path)
    with pytest.raises(BuildError, match="dynamic height/width; give --input-size"):
        _build(source, tmp_path / "repo")
    report = _build(source, tmp_path / "repo", input_size=12)
    manifest = report.manifest  # type: ignore[attr-defined]
    assert manifest.input.shape == (-1, 3, 12, 12)
    assert manifest.preprocessing.crop == 12 and manifest.verification.passed


def test_a_static_input_must_match_input_size(tmp_path: Path) -> None:
    source = save(residual_net(), tmp_path / "src" / "static.onnx")  # 8x8
    with pytest.raises(BuildError, match="input is 8x8; --input-size 12 does not match"):
        _build(source, tmp_path / "repo", input_size=12)
    assert _build(source, tmp_path / "repo", input_size=8).manifest.preprocessing.crop == 8  # type: ignore[attr-defined]


def test_named_model_options_are_refused_for_onnx_files(tmp_path: Path) -> None:
    source = save(residual_net(), tmp_path / "src" / "static.onnx")
    with pytest.raises(BuildError, match="--weights and --opset apply to named models"):
        _build(source, tmp_path / "repo", weights="random")
    with pytest.raises(BuildError, match=r"--input-size 4: use 8\.\.4096"):
        _build(Path("mobilenet_v2"), tmp_path / "repo", input_size=4)


def test_a_named_model_builds_at_another_input_size(tmp_path: Path) -> None:
    pytest.importorskip("torchvision")
    report = _build(Path("mobilenet_v2"), tmp_path / "repo", weights="random", input_size=32,
                    max_blocks=4)
    manifest = report.manifest  # type: ignore[attr-defined]
    assert manifest.input.shape == (-1, 3, 32, 32)
    assert (manifest.preprocessing.crop, manifest.preprocessing.resize) == (32, 37)
    assert manifest.verification.passed


def test_a_size_the_model_cannot_take_is_refused_with_the_reason(tmp_path: Path) -> None:
    pytest.importorskip("torchvision")
    with pytest.raises(BuildError, match="vgg16 cannot take 16x16 inputs"):  # 5 poolings
        _build(Path("vgg16"), tmp_path / "repo", weights="random", input_size=16)


def test_a_named_model_builds_for_a_non_square_frame(tmp_path: Path) -> None:
    pytest.importorskip("torchvision")
    import numpy as np

    from engines.preprocess import pixels

    report = _build(Path("mobilenet_v2"), tmp_path / "repo", weights="random", input_size=24,
                    input_width=40, max_blocks=4)
    manifest = report.manifest  # type: ignore[attr-defined]
    assert manifest.input.shape == (-1, 3, 24, 40)
    prep = manifest.preprocessing
    assert (prep.crop, prep.crop_width) == (24, 40) and manifest.verification.passed
    assert manifest.fingerprint == manifest.content_fingerprint()
    for h, w in ((720, 1280), (480, 640), (300, 200)):  # any frame is resized to cover it
        frame = np.zeros((h, w, 3), np.uint8)
        assert pixels(frame, prep).shape == (1, 3, 24, 40)


def test_non_square_sizes_are_refused_where_they_cannot_apply(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="pads its convolutions for a square input"):
        _build(Path("efficientnet_lite0"), tmp_path / "repo", input_size=24, input_width=40)
    source = _dynamic_hw(tmp_path)
    with pytest.raises(BuildError, match="non-square sizes apply to named models"):
        _build(source, tmp_path / "repo", input_size=24, input_width=40)
