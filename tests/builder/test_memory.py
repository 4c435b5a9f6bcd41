"""``--max-memory``: sizes parse, a budget refuses what would not fit before the work starts,
stops a build that grows past it, and a failed build leaves nothing behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder.memory import MB, MemoryBudget, parse_size, peak_rss_bytes, rss_bytes
from engines.errors import BuildError
from engines.repository import ModelRepository
from tests.conftest import build_tiny

linux_only = pytest.mark.skipif(rss_bytes() is None, reason="needs /proc/self/status")


@pytest.mark.parametrize(("text", "expected"), [
    ("2G", 2 << 30), ("1536M", 1536 * MB), ("800MB", 800 * MB), ("512MiB", 512 * MB),
    ("1.5g", 3 << 29), ("4194304", 4 * MB), ("64k", None), ("lots", None), ("", None),
])
def test_parse_size(text: str, expected: int | None) -> None:
    if expected is None:
        with pytest.raises(BuildError, match="--max-memory"):
            parse_size(text)
    else:
        assert parse_size(text) == expected
        assert parse_size(text, "--max-disk") == expected  # one meaning for every size flag


def test_parse_size_names_the_option_and_its_floor() -> None:
    with pytest.raises(BuildError, match=r"^--max-disk 'lots': give a size"):
        parse_size("lots", "--max-disk", minimum=1)
    assert parse_size("1K", "--max-disk", minimum=1) == 1024
    with pytest.raises(BuildError, match=r"^--max-disk '0' is too small \(at least 1 B\)"):
        parse_size("0", "--max-disk", minimum=1)


def test_no_budget_never_refuses() -> None:
    MemoryBudget().require(1 << 50, "anything")
    MemoryBudget().check("anywhere")


@linux_only
def test_budget_refuses_an_estimate_beyond_it_and_says_what_to_do() -> None:
    now = rss_bytes() or 0
    assert (peak_rss_bytes() or 0) >= now > 0
    budget = MemoryBudget(now + 256 * MB)
    budget.require(100 * MB, "a small step")
    with pytest.raises(BuildError, match=r"verifying x needs about 1.00 GB.*--max-memory "
                                         r".* is not enough: raise --max-memory"):
        budget.require(1024 * MB, "verifying x")


@linux_only
def test_build_within_budget_passes(tiny_onnx: Path, tmp_path: Path) -> None:
    _, manifest = build_tiny(tiny_onnx, tmp_path / "repo", segments="blocks",
                             max_memory=(rss_bytes() or 0) + (2 << 30))
    assert manifest.verification.passed


@linux_only
def test_build_over_budget_stops_cleanly(tiny_onnx: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    with pytest.raises(BuildError, match=r"over --max-memory .*--segments window:W"):
        build_tiny(tiny_onnx, repo, max_memory=16 * MB)  # below this process's own size
    assert ModelRepository(repo).list_models() == []
    assert list((repo / ".staging").iterdir()) == []


def test_imagenet_labels_do_not_load_torch() -> None:
    """A build from an ONNX file takes ImageNet's labels from torchvision's source without
    importing torch (about 700 MB resident)."""
    import subprocess
    import sys

    pytest.importorskip("torchvision")
    code = ("import sys; from builder.sources import imagenet_labels; labels = imagenet_labels();"
            "print(len(labels), labels[281], 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.split() == ["1000", "tabby", "False"]
    from torchvision.models import ResNet18_Weights

    from builder.sources import imagenet_labels

    assert imagenet_labels() == tuple(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


@linux_only
def test_build_reports_the_peak_of_each_phase(tiny_onnx: Path, tmp_path: Path) -> None:
    from builder.build import BuildOptions, build

    report = build(BuildOptions(model=str(tiny_onnx), repo=tmp_path / "repo", backend="ort",
                                segments="window:2", profile_repeats=2))
    peaks = report.peak_rss_mb
    if "export" not in peaks:
        pytest.skip("this kernel cannot reset the peak (/proc/self/clear_refs)")
    assert {"analyse", "extract", "verify", "profile", "manifest", "build"} <= set(peaks)
    after = [v for k, v in peaks.items() if k not in ("export", "build")]
    assert peaks["build"] == max(after) and all(v > 0 for v in peaks.values())
