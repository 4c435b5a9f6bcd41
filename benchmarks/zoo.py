"""Model zoo check: does ``armdi build FILE --segments blocks`` take any image model?

Each torchvision family is exported as a user would export it,
``torch.onnx.export(model, (x,), f, dynamo=True)`` with random weights and a batch of 1, then
built from the file in a fresh process. Printed per model: blocks, export and build seconds,
the verification's largest relative and absolute error, and the build's peak resident memory
(the build process alone; the export runs in its own process). Not part of ``make test``.

    .venv/bin/python benchmarks/zoo.py                          # every family below
    .venv/bin/python benchmarks/zoo.py --models convnext_tiny swin_t
    make zoo

Writes ``--json`` (default ``bench-results/zoo.json``). Asserts nothing: a failed model is a
row with its error, and the exit status is 1 if any model failed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ZOO = {  # family -> input size
    "squeezenet1_0": 224, "mnasnet0_5": 224, "regnet_y_400mf": 224, "efficientnet_b0": 224,
    "inception_v3": 299, "vit_b_16": 224, "mobilenet_v3_small": 224, "convnext_tiny": 224,
    "swin_t": 224,
}

_EXPORT = """
import contextlib, io, sys, warnings
import torch, torchvision
name, size, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
kwargs = {"aux_logits": False, "init_weights": True} if name == "inception_v3" else {}
model = getattr(torchvision.models, name)(weights=None, **kwargs).eval()
with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
    warnings.simplefilter("ignore")
    torch.onnx.export(model, (torch.randn(1, 3, size, size),), out, dynamo=True)
"""

_BUILD = """
import json, sys
from pathlib import Path
from builder.build import BuildOptions, build
from builder.memory import peak_rss_bytes
from engines.errors import ArmdiError
row = {}
try:
    report = build(BuildOptions(model=sys.argv[1], repo=Path(sys.argv[2]), segments="blocks",
                                backend="ort", profile_repeats=3, profile_segments=0))
    v = report.manifest.verification
    row = {"blocks": report.manifest.blocks, "passed": v.passed,
           "relative_error": v.max_relative_error, "max_abs_error": v.max_abs_error,
           "seconds": report.seconds}
except ArmdiError as exc:
    row = {"error": str(exc)}
row["peak_rss_mb"] = (peak_rss_bytes() or 0) / 2**20
print("ZOO " + json.dumps(row))
"""


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def check(name: str, size: int, work: Path, timeout: float) -> dict[str, Any]:
    source = work / f"{name}.onnx"
    t0 = time.perf_counter()
    try:
        done = _run(["-c", _EXPORT, name, str(size), str(source)], timeout)
    except subprocess.TimeoutExpired:
        return {"model": name, "error": f"export took over {timeout:.0f} s"}
    export_s = time.perf_counter() - t0
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"model": name, "export_s": export_s, "error": f"export failed: {last}"}
    t0 = time.perf_counter()
    try:
        done = _run(["-c", _BUILD, str(source), str(work / "repo")], timeout)
    except subprocess.TimeoutExpired:
        return {"model": name, "export_s": export_s, "error": f"build took over {timeout:.0f} s"}
    build_s = time.perf_counter() - t0
    lines = [line for line in done.stdout.splitlines() if line.startswith("ZOO ")]
    if not lines:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"model": name, "export_s": export_s, "build_s": build_s,
                "error": f"build crashed: {last}"}
    row: dict[str, Any] = json.loads(lines[-1][4:])
    source.unlink(missing_ok=True)
    return {"model": name, "export_s": export_s, "build_s": build_s, **row}


def table(rows: list[dict[str, Any]]) -> str:
    head = ("model", "blocks", "export s", "build s", "rel err", "abs err", "peak RSS MB",
            "result")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        err = r.get("error")
        lines.append(" | ".join([
            r["model"], str(r.get("blocks", "")), f"{r.get('export_s', 0):.1f}",
            f"{r.get('build_s', 0):.1f}",
            f"{r['relative_error']:.1e}" if r.get("relative_error") is not None else "",
            f"{r['max_abs_error']:.1e}" if r.get("max_abs_error") is not None else "",
            f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") else "",
            "ok" if err is None else f"FAILED: {err[:160]}",
        ]))
    return "\n".join(f"| {line} |" for line in lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(ZOO), choices=list(ZOO))
    parser.add_argument("--json", type=Path, default=ROOT / "bench-results" / "zoo.json")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per step")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="armdi-zoo-") as tmp:
        for name in args.models:
            print(f"{name}: exporting and building ...", flush=True)
            row = check(name, ZOO[name], Path(tmp), args.timeout)
            print(f"  {json.dumps(row)}", flush=True)
            rows.append(row)
    print(table(rows))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
