"""The ``armdi`` command line: the composition root.

The only module of ``appliance`` that imports ``builder`` or ``web``, always lazily, so a
worker node never loads torch or FastAPI it does not use. Every ``ArmdiError`` becomes one
readable line on stderr and exit status 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from engines.errors import ArmdiError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="armdi: adaptive and resilient model-distributed inference for edge clusters.",
    pretty_exceptions_enable=False,
)

RepoOption = Annotated[
    Path | None,
    typer.Option("--repo", help="Model repository directory [default: ~/.local/share/armdi]."),
]


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def _repo_path(repo: Path | None) -> Path:
    from engines.repository import default_repo

    return repo.expanduser() if repo is not None else default_repo()


@app.command()
def build(
    model: Annotated[str, typer.Argument(help="efficientnet_lite0 (default model), "
                                              "mobilenet_v2, resnet18, resnet50, vgg16, "
                                              "googlenet, densenet121, or a path to an .onnx "
                                              "file.")] = "efficientnet_lite0",
    weights: Annotated[str, typer.Option(help="pretrained | random | PATH to a state dict.")]
    = "pretrained",
    backend: Annotated[str, typer.Option(help="auto | ort | trt")] = "auto",
    segments: Annotated[str, typer.Option(help="all | blocks | window:W")] = "all",
    max_blocks: Annotated[int | None, typer.Option(
        help="Merge the cheapest neighbouring blocks until at most N remain.")] = None,
    name: Annotated[str | None, typer.Option(help="Model id (default: the model name or the "
                                                  "ONNX file's stem).")] = None,
    input_size: Annotated[int, typer.Option(help="Input height/width of an ONNX file's "
                                                 "model.")] = 224,
    threads: Annotated[int, typer.Option(help="Threads per engine when profiling.")] = 1,
    fp16: Annotated[bool, typer.Option(help="TensorRT: build FP16 engines.")] = False,
    if_missing: Annotated[bool, typer.Option(help="Do nothing if the model is already "
                                                  "built.")] = False,
    repo: RepoOption = None,
) -> None:
    """Build a model into verified, profiled segment engines in the model repository."""
    from builder.build import BuildOptions
    from builder.build import build as run_build
    from builder.progress import RichReporter
    from engines.repository import ModelRepository

    root = _repo_path(repo)
    if if_missing:
        model_id = name or (Path(model).stem if model.endswith(".onnx") else model)
        repository = ModelRepository(root)
        if repository.has_model(model_id):
            try:
                repository.check_all(repository.load_manifest(model_id))
                typer.echo(f"{model_id} is already built in {root}")
                return
            except ArmdiError as exc:
                typer.echo(f"rebuilding {model_id}: {exc}", err=True)
    options = BuildOptions(model=model, repo=root, weights=weights, name=name,
                           input_size=input_size, backend=backend, segments=segments,
                           max_blocks=max_blocks, threads=threads, fp16=fp16)
    report = run_build(options, RichReporter())
    m = report.manifest
    total = sum(len(v) for v in m.segments.values())
    typer.echo(
        f"built {m.model_id}: {m.blocks} blocks, {total} segment engines "
        f"({', '.join(f'{k}: {len(v)}' for k, v in m.segments.items())}), verified "
        f"(max abs error {m.verification.max_abs_error:.2g}) in "
        f"{sum(report.seconds.values()):.1f} s -> {report.path}"
    )


def inspect_data(manifest: Any) -> dict[str, Any]:
    """The JSON of ``armdi inspect``."""
    profiles = {
        key: {
            "device": p.device, "backend": p.backend, "threads": p.threads,
            "full_model_ms": round(p.full_model_ms, 4),
            "sum_block_ms": round(sum(p.block_ms), 4),
            "block_ms": [round(t, 4) for t in p.block_ms],
            "segment_ms": {k: round(v, 4) for k, v in p.segment_ms.items()},
        }
        for key, p in manifest.profiles.items()
    }
    first = next(iter(manifest.profiles.values()), None)
    return {
        "model_id": manifest.model_id,
        "fingerprint": manifest.fingerprint,
        "source": manifest.source.model_dump(),
        "input": manifest.input.model_dump(),
        "output": manifest.output.model_dump(),
        "blocks": manifest.blocks,
        "cut_points": [
            {"index": c.index, "tensor": c.name, "shape": list(c.shape), "dtype": c.dtype,
             "bytes": c.bytes_per_sample}
            for c in manifest.cut_points
        ],
        "block_ms": [round(t, 4) for t in first.block_ms] if first else None,
        "segments": {backend: len(entries) for backend, entries in manifest.segments.items()},
        "segment_mode": manifest.segment_mode,
        "verification": manifest.verification.model_dump(),
        "profiles": profiles,
    }


@app.command()
def inspect(
    model_id: Annotated[str, typer.Argument(help="A model id in the repository.")]
    = "efficientnet_lite0",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    repo: RepoOption = None,
) -> None:
    """Cut points, block costs, activation sizes, segments and verification of a model."""
    from engines.repository import ModelRepository

    manifest = ModelRepository(_repo_path(repo)).load_manifest(model_id)
    data = inspect_data(manifest)
    if as_json:
        typer.echo(json.dumps(data, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    v = manifest.verification
    console.print(f"[bold]{manifest.model_id}[/] ({manifest.source.kind}:{manifest.source.name}, "
                  f"weights {manifest.source.weights}) fingerprint {manifest.fingerprint[:16]}")
    console.print(f"{manifest.blocks} blocks; segments: {data['segments']} "
                  f"({manifest.segment_mode}); verification: "
                  f"{'passed' if v.passed else 'FAILED'}, max abs error {v.max_abs_error:.2g} "
                  f"(tolerance {v.tolerance:g}), top-1 agreement {v.top1_agreement:.0%}")
    block_ms = data["block_ms"] or []
    table = Table("boundary", "tensor", "shape", "KiB/sample", "next block ms")
    for cut in manifest.cut_points:
        cost = f"{block_ms[cut.index]:.3f}" if cut.index < len(block_ms) else ""
        table.add_row(str(cut.index), cut.name, str(list(cut.shape)),
                      f"{cut.bytes_per_sample / 1024:.1f}", cost)
    console.print(table)
    for key, p in data["profiles"].items():
        console.print(f"profile {key}: full model {p['full_model_ms']:.2f} ms, "
                      f"sum of blocks {p['sum_block_ms']:.2f} ms")


def main() -> None:
    try:
        app()
    except ArmdiError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
