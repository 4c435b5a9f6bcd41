"""Build figures: what ``armdi build --segments all`` costs, per model, on this machine.

For each model: wall time per build phase, blocks, segments, the verification's max abs error,
the repository's size against the source ONNX file's, and the sum of the per-block latencies
against the full model's latency (ONNX Runtime, CPU, batch 1, one thread).

Named models are built by name (efficientnet_lite0 with its ImageNet weights; torchvision
models with ``--weights random``, since the benchmark machine has no network). ``googlenet``
and ``densenet121`` are first exported to ``.onnx`` files with ``builder.sources.export_torch``
and then built from those files, as a user with their own ONNX file would.

    .venv/bin/python benchmarks/build_figures.py                       # every model
    .venv/bin/python benchmarks/build_figures.py --models vgg16        # one; merged into the JSON

Results are merged into ``--json`` (default ``bench-results/build_figures.json``) by model, so
models can be run one at a time; the table printed at the end covers every model in the file.
This is a benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import builder.build as build_mod  # noqa: E402
from builder.build import BuildOptions, build  # noqa: E402
from builder.progress import SilentReporter  # noqa: E402
from builder.sources import SourceModel, export_torch, resolve  # noqa: E402

NAMED = {"efficientnet_lite0": "pretrained", "mobilenet_v2": "random", "resnet18": "random",
         "vgg16": "random"}
FROM_FILE = ("googlenet", "densenet121")
MODELS = (*NAMED, *FROM_FILE)
PHASES = ("export_s", "analyse_s", "merge_s", "extract_s", "verify_s", "profile_s")


class _NotingReporter(SilentReporter):
    """Silent, but prints the builder's notes with a timestamp so a long run shows progress."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def note(self, message: str) -> None:
        print(f"  [{time.perf_counter() - self.t0:7.1f} s] {message}", flush=True)


def _export_file(name: str, out: Path) -> float:
    """Export a torchvision model with seeded random weights to ``out``; returns seconds."""
    import torch
    import torchvision

    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    module = getattr(torchvision.models, name)(weights=None, **kwargs).eval()
    t0 = time.perf_counter()
    export_torch(module, out)
    return time.perf_counter() - t0


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure(model: str, repo: Path, workdir: Path, threads: int) -> dict[str, Any]:
    source_bytes: dict[str, int] = {}
    original_resolve = resolve

    def recording_resolve(*args: Any, **kwargs: Any) -> SourceModel:
        source = original_resolve(*args, **kwargs)
        source_bytes["onnx"] = source.onnx_path.stat().st_size
        return source

    file_export_s = 0.0
    if model in FROM_FILE:
        path = workdir / f"{model}.onnx"
        print(f"  exporting {model} (random weights) to {path.name}", flush=True)
        file_export_s = _export_file(model, path)
        options = BuildOptions(model=str(path), repo=repo, segments="all", backend="ort",
                               threads=threads)
        weights = "random (exported file)"
    else:
        options = BuildOptions(model=model, repo=repo, segments="all", backend="ort",
                               weights=NAMED[model], threads=threads)
        weights = NAMED[model]

    # The build deletes its exported source with the staging folder: note its size on the way.
    vars(build_mod)["resolve"] = recording_resolve
    try:
        t0 = time.perf_counter()
        report = build(options, _NotingReporter())
        total_s = time.perf_counter() - t0
    finally:
        vars(build_mod)["resolve"] = original_resolve

    m = report.manifest
    phases = {key: round(report.seconds.get(key, 0.0), 2) for key in PHASES}
    if model in FROM_FILE:
        phases["export_s"] = round(file_export_s, 2)  # the build itself only read the file
    phases["hash_and_move_s"] = round(total_s - sum(report.seconds.values()), 2)
    (profile,) = m.profiles.values()
    repo_bytes = _dir_bytes(report.path)
    segment_bytes = sum(e.bytes for name, e in m.files.items() if name.startswith("seg_"))
    return {
        "model": model,
        "weights": weights,
        "source": "onnx file" if model in FROM_FILE else "named",
        "blocks": m.blocks,
        "segments": len(m.segments["ort"]),
        "total_s": round(total_s + (file_export_s if model in FROM_FILE else 0.0), 2),
        "phases_s": phases,
        "verification": {
            "passed": m.verification.passed,
            "max_abs_error": m.verification.max_abs_error,
            "top1_agreement": m.verification.top1_agreement,
            "segments_checked": m.verification.segments_checked,
            "detail": m.verification.detail,
        },
        "source_onnx_bytes": source_bytes["onnx"],
        "repository_bytes": repo_bytes,
        "weights_bytes": m.files[m.weights_file].bytes,
        "segment_files_bytes": segment_bytes,
        "repository_ratio": round(repo_bytes / source_bytes["onnx"], 3),
        "full_model_ms": round(profile.full_model_ms, 3),
        "sum_block_ms": round(sum(profile.block_ms), 3),
        "block_sum_ratio": round(sum(profile.block_ms) / profile.full_model_ms, 3),
        "max_activation_bytes": max(m.activation_bytes()),
        "input_bytes": m.activation_bytes()[0],
        "device": profile.device,
        "threads": profile.threads,
    }


def table(results: dict[str, dict[str, Any]]) -> str:
    header = ("model", "blocks", "segs", "export", "analyse", "extract", "verify", "profile",
              "hash+mv", "total s", "max err", "src MB", "repo MB", "ratio", "sum blk ms",
              "full ms", "sum/full")
    rows = [header]
    for model in [m for m in MODELS if m in results] + sorted(set(results) - set(MODELS)):
        r = results[model]
        p = r["phases_s"]
        rows.append((
            model + (" (file)" if r["source"] == "onnx file" else ""), str(r["blocks"]),
            str(r["segments"]), f"{p['export_s']:.1f}", f"{p['analyse_s']:.1f}",
            f"{p['extract_s']:.1f}", f"{p['verify_s']:.1f}", f"{p['profile_s']:.1f}",
            f"{p['hash_and_move_s']:.1f}", f"{r['total_s']:.1f}",
            f"{r['verification']['max_abs_error']:.1e}",
            f"{r['source_onnx_bytes'] / 1e6:.1f}", f"{r['repository_bytes'] / 1e6:.1f}",
            f"{r['repository_ratio']:.2f}", f"{r['sum_block_ms']:.2f}",
            f"{r['full_model_ms']:.2f}", f"{r['block_sum_ratio']:.2f}",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
             for row in rows]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--json", type=Path, default=ROOT / "bench-results" /
                        "build_figures.json")
    parser.add_argument("--repo", type=Path, default=None,
                        help="repository to build into (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the built repository")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(models) - set(MODELS)
    if unknown:
        parser.error(f"unknown models: {', '.join(sorted(unknown))}")

    results: dict[str, dict[str, Any]] = {}
    if args.json.is_file():
        results = json.loads(args.json.read_text()).get("models", {})
    workdir = Path(tempfile.mkdtemp(prefix="armdi-build-figures-"))
    repo = args.repo or workdir / "repo"
    try:
        for model in models:
            print(f"== {model}", flush=True)
            results[model] = measure(model, repo, workdir, args.threads)
            print(json.dumps(results[model], indent=1), flush=True)
            if not args.keep:
                shutil.rmtree(repo / model, ignore_errors=True)
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({
                "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
                "models": results,
            }, indent=1))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(table(results))
    print(f"\nwritten to {args.json}")


if __name__ == "__main__":
    main()
