"""ConvNeXt and Swin as a user exports them (``torch.onnx.export(model, x, f, dynamo=True)``,
a static batch of 1). Their global pooling of a channels-last tensor is written as
``ReduceMean -> Reshape to (C,) -> Gather back to (1, C, 1, 1)``: a tensor without a batch
axis that is nevertheless the only one live at that point. A tiny module with the same
pattern runs in every test run; the real torchvision models (random weights) are ``slow``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from builder.graph import analyse
from tests.conftest import build_tiny, run_onnx

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")


def _export(module: object, path: Path, size: int) -> Path:
    import contextlib
    import io
    import warnings

    x = torch.randn(1, 3, size, size)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), str(path), dynamo=True)
    return path


class TinyConvNeXtHead(torch.nn.Module):  # type: ignore[misc,name-defined]
    """A patchify stem, one channels-last residual block (as ConvNeXt's ``CNBlock``: the
    branch is permuted and scaled, so the sum keeps channels-last strides), then
    ``AdaptiveAvgPool2d(1)``, a channels-last LayerNorm and a linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 4, stride=4)
        self.mix = torch.nn.Linear(16, 16)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.norm = torch.nn.LayerNorm(16)
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x: Any) -> Any:
        x = self.stem(x)
        x = self.mix(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) * 0.5 + x
        x = self.norm(self.pool(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.head(torch.flatten(x, 1))


def test_tiny_convnext_head_builds_and_verifies(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = _export(TinyConvNeXtHead().eval(), tmp_path / "tiny_convnext.onnx", 32)
    import onnx

    model = onnx.load(str(source))
    ops = {n.op_type for n in model.graph.node}
    assert "Gather" in ops  # the exporter's as_strided: the pattern under test
    dominators = analyse(model).cuts
    repo, manifest = build_tiny(source, tmp_path / "repo", segments="all")
    cut_names = [c.name for c in manifest.cut_points]
    batchless = [name for name in dominators if name not in cut_names]
    assert len(batchless) == 1  # the (16,) tensor: its two blocks are joined
    assert all(c.shape[0] == 1 and len(c.shape) >= 2 for c in manifest.cut_points)
    assert manifest.verification.passed
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    y = x
    for k in range(manifest.blocks):
        y = run_onnx(repo / manifest.model_id / f"seg_{k:04d}_{k + 1:04d}.onnx", y)[0]
    np.testing.assert_allclose(y, run_onnx(source, x)[0], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["convnext_tiny", "swin_t"])
def test_torchvision_model_builds_from_a_user_export(tmp_path: Path, name: str) -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    module = getattr(torchvision.models, name)(weights=None).eval()
    source = _export(module, tmp_path / f"{name}.onnx", 224)
    _, manifest = build_tiny(source, tmp_path / "repo", segments="blocks",
                             profile_repeats=1, profile_segments=0)
    assert manifest.blocks >= 40
    v = manifest.verification
    assert v.passed and v.max_relative_error is not None and v.max_relative_error < 1e-4
    assert manifest.output.shape == (1, 1000)
