"""The ``armdi`` command line: the composition root.

The only module of ``appliance`` that imports ``builder`` or ``web``, always lazily, so a
worker node never loads torch or FastAPI it does not use. Every ``ArmdiError`` becomes one
readable line on stderr and exit status 1.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
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
    typer.Option("--repo", help="Model repository directory (default: ~/.local/share/armdi)."),
]


@app.callback()
def _root(
    log_level: Annotated[str, typer.Option(help="DEBUG | INFO | WARNING | ERROR")] = "INFO",
) -> None:
    import logging

    if log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        _fail(f"--log-level {log_level!r}: use DEBUG, INFO, WARNING or ERROR")
    logging.basicConfig(level=getattr(logging, log_level.upper()),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)


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
    input_size: Annotated[str | None, typer.Option(
        help="H[xW]: a named model is exported at this input size (e.g. 32, or 720x1280 for "
             "a camera frame); an ONNX file whose input size is dynamic needs N.")] = None,
    threads: Annotated[int, typer.Option(help="Threads per engine when profiling.")] = 1,
    fp16: Annotated[bool, typer.Option(help="TensorRT: build FP16 engines.")] = False,
    opset: Annotated[int | None, typer.Option(
        help="ONNX opset of the export: 18 (default) or 17 for TensorRT 8.x "
             "(chosen automatically with --backend trt).")] = None,
    if_missing: Annotated[bool, typer.Option(help="Do nothing if the model is already "
                                                  "built.")] = False,
    max_memory: Annotated[str | None, typer.Option(
        help="Resident memory the build may use after the export (e.g. 2G, 1500M); it "
             "refuses what would not fit.")] = None,
    plan: Annotated[bool, typer.Option(
        "--plan", help="TensorRT: print what the build would make and cost (engines, disk "
                       "with stripped and full plans, time, free disk); build nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="With --plan: print JSON.")] = False,
    max_disk: Annotated[str | None, typer.Option(
        help="TensorRT: refuse a build that adds more than this to the disk (e.g. 2G).")]
    = None,
    prebuild_ratio: Annotated[float, typer.Option(
        help="TensorRT: build block engines, then fused segments most likely first until the "
             "repository is this many times the ONNX model; the rest on demand (0: all).")]
    = 1.5,
    config: Annotated[Path | None, typer.Option(
        "--config", help="TensorRT: build fused segments first around the allocator's "
                         "optimum for this cluster (cluster.toml).")] = None,
    repo: RepoOption = None,
) -> None:
    """Build a model into verified, profiled segment engines in the model repository."""
    from builder.build import BuildOptions
    from builder.build import build as run_build
    from builder.memory import parse_size
    from builder.progress import RichReporter
    from builder.trt_plan import TrtPlanOptions
    from engines.repository import ModelRepository

    root = _repo_path(repo)
    height, width = _input_size(input_size)
    try:
        trt_options = TrtPlanOptions(
            max_disk=(parse_size(max_disk, "--max-disk", minimum=1)
                      if max_disk is not None else None),
            prebuild_ratio=prebuild_ratio, plan_only=plan)
    except (ValueError, ArmdiError) as exc:
        _fail(str(exc))
    if config is not None:
        trt_options = _likely_boundaries(trt_options, config, root, name or model)
    if plan:
        if backend != "trt":
            _fail("--plan is for TensorRT builds: add --backend trt")
        _print_plan(BuildOptions(model=model, repo=root, weights=weights, name=name,
                                 input_size=height, input_width=width, backend=backend,
                                 segments=segments, max_blocks=max_blocks, fp16=fp16, opset=opset,
                                 trt=trt_options), as_json)
        return
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
                           input_size=height, input_width=width, backend=backend,
                           segments=segments, max_blocks=max_blocks, threads=threads,
                           fp16=fp16, opset=opset,
                           max_memory=parse_size(max_memory) if max_memory else None,
                           trt=trt_options)
    report = run_build(options, RichReporter())
    m = report.manifest
    total = sum(len(v) for v in m.segments.values())
    typer.echo(
        f"built {m.model_id}: {m.blocks} blocks, {total} segment engines "
        f"({', '.join(f'{k}: {len(v)}' for k, v in m.segments.items())}), verified "
        f"(max abs error {m.verification.max_abs_error:.2g}, relative "
        f"{m.verification.max_relative_error or 0:.2g}) in "
        f"{sum(report.seconds.values()):.1f} s -> {report.path}"
    )


def _likely_boundaries(options: Any, config_path: Path, root: Path, model_id: str) -> Any:
    """``options`` with the allocator's optimum for the cluster of ``config_path``: exact
    where the model is built (its profile and activation sizes), else its device count."""
    import dataclasses

    from appliance.config import load_config
    from appliance.control.allocator import snapshot_from_profile, solve
    from engines.device import device_signature
    from engines.repository import ModelRepository

    cluster = load_config(config_path)
    source, workers = cluster.source, cluster.workers
    devices = (1 if source.run_blocks else 0) + len(workers)
    repository = ModelRepository(root)
    if not repository.has_model(model_id):
        return dataclasses.replace(options, workers=max(1, devices))
    manifest = repository.load_manifest(model_id)
    profile = manifest.profile_for(device_signature(), "trt")
    base = list(profile.block_ms) if profile else [1.0] * manifest.blocks
    nodes = [source, *workers]
    snapshot = snapshot_from_profile(
        [base] * len(nodes), manifest.activation_bytes(),
        bandwidth_Bps=[n.bandwidth_Bps for n in nodes],
        latency_ms=[n.latency_ms for n in nodes], slowdown=[n.slowdown for n in nodes],
        max_blocks=[source.max_blocks if source.run_blocks else 0]
        + [w.max_blocks for w in workers])
    return dataclasses.replace(options, boundaries=tuple(solve(snapshot).boundaries))


def _print_plan(options: Any, as_json: bool) -> None:
    """``armdi build --backend trt --plan``: the plan, exit status 1 when it is refused."""
    from builder.trt_plan import plan_build

    result = plan_build(options)
    typer.echo(json.dumps(result.to_json(), indent=1) if as_json else result.render())
    if result.refused:
        raise typer.Exit(1)


@app.command()
def pack(
    model_id: Annotated[str, typer.Argument(help="A model id in the repository.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="The pack to write "
                                                               "(a .tar file).")],
    repo: RepoOption = None,
) -> None:
    """Write a built model to one tar file, to install on other devices with armdi unpack."""
    from engines.pack import pack as run_pack
    from engines.repository import ModelRepository

    report = run_pack(ModelRepository(_repo_path(repo)), model_id, output)
    m = report.manifest
    typer.echo(f"packed {m.model_id} (fingerprint {m.fingerprint[:16]}): {report.files} files, "
               f"{report.bytes / 1e6:.1f} MB -> {report.path}")
    typer.echo(f"on each device: armdi unpack {report.path.name} [--repo DIR]")


@app.command()
def unpack(
    archive: Annotated[Path, typer.Argument(help="A pack written by armdi pack.")],
    profile: Annotated[bool, typer.Option(help="Profile the model's blocks on this device "
                                               "for the allocator.")] = True,
    threads: Annotated[int, typer.Option(help="Threads per engine when profiling.")] = 1,
    repo: RepoOption = None,
) -> None:
    """Install a packed model into the repository, verifying the manifest and every file."""
    from engines.pack import unpack as run_unpack
    from engines.repository import ModelRepository

    repository = ModelRepository(_repo_path(repo))
    report = run_unpack(archive, repository)
    m = report.manifest
    if report.unchanged:
        typer.echo(f"{m.model_id} (fingerprint {m.fingerprint[:16]}) is already installed in "
                   f"{repository.root}; unchanged")
    else:
        was = "" if report.replaced is None else (
            " (replaced a model this armdi could not read)" if report.replaced == "unreadable"
            else f" (replaced fingerprint {report.replaced[:16]})")
        typer.echo(f"unpacked {m.model_id} (fingerprint {m.fingerprint[:16]}): {report.files} "
                   f"files, {report.bytes / 1e6:.1f} MB verified -> {report.path}{was}")
    if profile and (not report.unchanged or _needs_profile(m)):
        _profile_here(repository, m.model_id, threads)


def _needs_profile(manifest: Any) -> bool:
    from engines.device import device_signature

    return all(p.device != device_signature() for p in manifest.profiles.values())


def _profile_here(repository: Any, model_id: str, threads: int = 1) -> None:
    """Time the model's blocks on this device (ONNX Runtime) and keep them in its manifest."""
    from builder.profile import profile_installed
    from builder.progress import SilentReporter

    typer.echo(f"profiling {model_id}'s blocks on this device ...", err=True)
    p = profile_installed(repository, model_id, SilentReporter(), threads=threads)
    typer.echo(f"profiled {model_id} on {p.device}: full model {p.full_model_ms:.2f} ms, sum of "
               f"{len(p.block_ms)} blocks {sum(p.block_ms):.2f} ms")


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
    from engines.device import device_signature

    first = manifest.profile_for(device_signature(), "ort")  # this device's, where it has one
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
                  f"{'passed' if v.passed else 'FAILED'}, max abs error {v.max_abs_error:.2g}"
                  + (f", relative {v.max_relative_error:.2g}" if v.max_relative_error is not None
                     else "")
                  + f" (tolerance {v.tolerance:g}), top-1 agreement {v.top1_agreement:.0%}")
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


ConfigOption = Annotated[Path, typer.Option("--config", help="cluster.toml")]


LinkOption = Annotated[str | None, typer.Option(
    "--link", help="Shape every node's outgoing link: RATE[,DELAY], e.g. 20mbit or "
                   "100mbit,5ms. Network namespaces and tc where root, else emulated in the "
                   "transport (the output says which).")]
LinkShapingOption = Annotated[str, typer.Option(
    help="--link with auto (tc where possible), tc (fail without it) or transport.")]


def _link(text: str | None) -> Any:
    from appliance.netlinks import parse_link

    return None if text is None else parse_link(text)


def _link_shaping(text: str) -> str:
    if text not in ("auto", "tc", "transport"):
        _fail(f"--link-shaping {text!r}: use auto, tc or transport")
    return text


def _stop_on_signals() -> Any:
    import signal
    import threading

    stop = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


@app.command()
def node(
    config: ConfigOption,
    name: Annotated[str, typer.Option("--name", help="This worker's name in the config.")],
    parent_pid: Annotated[int | None, typer.Option(
        hidden=True, help="Stop when this process is gone (set by armdi up).")] = None,
    join: Annotated[str | None, typer.Option(
        "--join", help="Join a running cluster through this member's control address (a "
                       "worker's or the source's); the source admits it and re-allocates.")
    ] = None,
) -> None:
    """Run one worker of a cluster (until SIGINT/SIGTERM or a Shutdown message)."""
    import dataclasses

    from appliance.config import load_config
    from appliance.data.node import Node
    from appliance.settings import node_settings

    cfg = load_config(config)
    _warn_readable_secrets(cfg, name)
    settings = node_settings(cfg, name, parent_pid)
    if join is not None:
        settings = dataclasses.replace(settings, join_addr=join)
    worker = Node(settings)
    stop = _stop_on_signals()
    worker.run(stop)
    if worker.join_refused is not None:
        typer.secho(f"error: join refused: {worker.join_refused}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)


def _warn_readable_secrets(cfg: Any, name: str) -> None:
    """Say so when the cluster key or this node's TLS key can be read by other users."""
    from appliance.keys import check_private_file

    for path in (cfg.cluster.key_file, cfg.node(name).tls_cert):
        warning = check_private_file(path) if path is not None else None
        if warning:
            typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)


def _input_size(text: str | None) -> tuple[int | None, int | None]:
    """``--input-size N`` or ``HxW`` as (height, width); width None when square."""
    if text is None:
        return None, None
    parts = text.lower().split("x")
    try:
        sides = [int(p) for p in parts]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2) or any(s <= 0 for s in sides):
        _fail(f"--input-size {text!r}: give N or HxW in pixels, e.g. 32 or 720x1280")
    height = sides[0]
    width = sides[1] if len(sides) == 2 and sides[1] != height else None
    return height, width


def _stale_named_model(repository: Any, model: str) -> str | None:
    """Why a named model's manifest cannot be loaded (e.g. built by an older armdi, before
    content fingerprints), when ``armdi up`` can simply build it again; else None."""
    from builder.sources import NAMED_MODELS
    from engines.errors import ManifestError

    if model not in NAMED_MODELS:
        return None
    try:
        repository.load_manifest(model)
    except ManifestError as exc:
        return str(exc).split("; rebuild")[0]
    return None


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _idle_lines(source: Any) -> list[str]:
    """One line per worker that runs no blocks, with the reason."""
    return [f"  {n.name} runs no blocks: {n.reason or n.state}"
            for n in source.status().nodes if n.role == "worker" and n.start == n.end]


TOKEN_ENV = "ARMDI_API_TOKEN"

TokenFileOption = Annotated[Path | None, typer.Option(
    "--api-token-file",
    help=f"File holding the API token that every request must then send as 'Authorization: "
         f"Bearer TOKEN' (health probes and the page's files excepted). Or set {TOKEN_ENV}. "
         "Without either the API has no authentication.")]


def api_token(token_file: Path | None, environ: Any = os.environ) -> str | None:
    """The API token, read once here: ``--api-token-file`` first, else ``ARMDI_API_TOKEN``,
    else None (no authentication)."""
    if token_file is not None:
        try:
            token = token_file.expanduser().read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ArmdiError(f"cannot read --api-token-file {token_file} ({exc})") from exc
        if not token:
            raise ArmdiError(f"--api-token-file {token_file} is empty; put the token in it")
        return token
    if TOKEN_ENV not in environ:
        return None
    token = str(environ[TOKEN_ENV]).strip()
    if not token:
        raise ArmdiError(f"{TOKEN_ENV} is set but empty; unset it to run without "
                         "authentication, or give it the token")
    return token


def _web_settings(token: str | None) -> Any:
    from web.app import WebSettings

    return WebSettings(api_token=token)


def _announce(sock: Any, token: str | None, what: str = "web front end:") -> None:
    """``what`` and the front end's URL, whether it needs a token, and a warning when it is
    reachable from other machines without one."""
    from web.server import exposure_warning, url_of

    typer.echo(f"{what} {url_of(sock)}")  # scripts read the URL at the end of this line
    if token is not None:
        typer.echo("API token required (Authorization: Bearer ...; the page asks for it)")
    warning = exposure_warning(sock, token)
    if warning is not None:
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)


@app.command()
def serve(config: ConfigOption, api_token_file: TokenFileOption = None) -> None:
    """Run the source and the web front end of a cluster."""
    from appliance.config import load_config
    from appliance.data.source import Source
    from appliance.settings import source_settings
    from engines.repository import ModelRepository
    from web.server import listen, serve

    token = api_token(api_token_file)
    cfg = load_config(config)
    _warn_readable_secrets(cfg, cfg.source.name)
    signal.signal(signal.SIGTERM, _raise_interrupt)  # from here on, SIGTERM cleans up too
    sock = listen(cfg.source.http_host, cfg.source.http_port)
    repository = ModelRepository(cfg.cluster.repo)
    if _needs_profile(repository.load_manifest(cfg.cluster.model)):
        _profile_here(repository, cfg.cluster.model)  # first start on this device
    source = Source(source_settings(cfg))
    try:
        source.start()
        _announce(sock, token, f"armdi serving {cfg.cluster.model} at")
        for line in _idle_lines(source):  # refused ones with the fix (another fingerprint)
            typer.echo(line)
        serve(source, sock, settings=_web_settings(token))
    except KeyboardInterrupt:
        pass
    finally:
        source.close()
        sock.close()


@app.command()
def up(
    nodes: Annotated[int, typer.Option(help="Worker processes besides the source.")] = 3,
    model: Annotated[str, typer.Option(help="Model id (built first if missing).")]
    = "efficientnet_lite0",
    mode: Annotated[str, typer.Option(help="armdi (adaptive: boundaries move at run time) | "
                                          "edgepipe (the static optimum) | ddi (every "
                                          "worker runs the whole model) | hybrid (DDI over "
                                          "chains of --chain-workers) | local | auto (the one "
                                          "predicted fastest, switched as speeds change)")]
    = "armdi",
    ddi_input: Annotated[str, typer.Option(help="mode ddi: images travel as uint8 pixels | "
                                               "jpeg (decoded on the worker)")] = "pixels",
    chain_workers: Annotated[int, typer.Option(
        help="mode hybrid: workers per chain (the chains run side by side).")] = 2,
    max_blocks: Annotated[str | None, typer.Option(
        help="Per-worker memory cap in blocks, e.g. 6 (every worker) or 6,6,12: a worker "
             "never runs more (ddi and local need one that holds the whole model).")] = None,
    slowdown: Annotated[str | None, typer.Option(
        help="Per-worker emulated slowdown factors, e.g. 1,2,4.")] = None,
    cpus: Annotated[str | None, typer.Option(
        help="Per-worker CPU pinning, e.g. 0,1 (use + for several: 0+1,2).")] = None,
    host: Annotated[str, typer.Option(help="Web front end host.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Web front end port.")] = 8000,
    wire_dtype: Annotated[str, typer.Option(help="float32 | float16 activations on the "
                                                 "wire.")] = "float32",
    min_workers: Annotated[int, typer.Option(
        help="The first N workers run at least one block each, even where the optimum "
             "would leave them out (demos, tests).")] = 0,
    supervise: Annotated[bool, typer.Option(
        help="Restart a worker that dies, with back-off (the chain routes around it "
             "meanwhile).")] = True,
    run_dir: Annotated[Path | None, typer.Option(help="Where sockets and the generated "
                                                      "cluster.toml live (default: a temp "
                                                      "dir, removed on exit).")] = None,
    link: LinkOption = None,
    link_shaping: LinkShapingOption = "auto",
    api_token_file: TokenFileOption = None,
    repo: RepoOption = None,
) -> None:
    """Start a whole cluster on this machine: workers, source and web front end."""
    import logging

    from appliance.cluster import (
        LocalClusterOptions,
        parse_cpus,
        parse_max_blocks,
        parse_slowdown,
        running,
    )
    from appliance.data.source import Source
    from appliance.settings import source_settings
    from engines.repository import ModelRepository

    if nodes < 0:
        _fail("--nodes must be 0 or more")
    if not 0 <= min_workers <= nodes:
        _fail(f"--min-workers must be between 0 and --nodes ({nodes})")
    if mode not in ("armdi", "edgepipe", "ddi", "hybrid", "local", "auto"):
        _fail(f"--mode {mode!r}: use armdi, edgepipe, ddi, hybrid, local or auto")
    if ddi_input not in ("pixels", "jpeg"):
        _fail(f"--ddi-input {ddi_input!r}: use pixels or jpeg")
    if chain_workers < 1:
        _fail(f"--chain-workers must be 1 or more, got {chain_workers}")
    if wire_dtype not in ("float32", "float16"):
        _fail(f"--wire-dtype {wire_dtype!r}: use float32 or float16")
    token = api_token(api_token_file)
    signal.signal(signal.SIGTERM, _raise_interrupt)  # from here on, SIGTERM cleans up too
    root = _repo_path(repo)
    if not ModelRepository(root).has_model(model):
        typer.echo(f"{model} is not built in {root}; building it first")
        build(model=model, repo=root)
    elif (stale := _stale_named_model(ModelRepository(root), model)) is not None:
        typer.echo(f"{model} in {root} cannot be served as built ({stale}); building it again")
        build(model=model, repo=root)
    options = LocalClusterOptions(
        model=model, repo=root, nodes=nodes, mode="local" if nodes == 0 else mode,
        ddi_input=ddi_input, chain_workers=chain_workers,
        max_blocks=parse_max_blocks(max_blocks, nodes),
        slowdown=parse_slowdown(slowdown, nodes), cpus=parse_cpus(cpus, nodes), host=host,
        port=port, wire_dtype=wire_dtype, run_dir=run_dir, min_workers=min_workers,
        supervise=supervise, link=_link(link), link_shaping=_link_shaping(link_shaping),
        log_level=logging.getLevelName(logging.getLogger().level),
    )
    from web.server import listen, serve

    sock = listen(host, port)  # before any worker starts: a port in use fails cleanly
    try:
        with running(options) as (cluster, cfg):
            source = Source(source_settings(cfg))
            try:
                source.start()
                b = source.allocation.boundaries if source.allocation else ()
                typer.echo(f"armdi up: {model}, {nodes} workers, mode {options.mode}, "
                           f"boundaries {list(b)}")
                if link is not None:
                    typer.echo(cluster.link_note)
                for line in _idle_lines(source):
                    typer.echo(line)
                _announce(sock, token)
                typer.echo("Ctrl-C stops everything")
                serve(source, sock, settings=_web_settings(token))
            except KeyboardInterrupt:
                pass
            finally:
                source.close()
    finally:
        sock.close()
    typer.echo("armdi up: stopped")


@app.command()
def classify(
    images: Annotated[list[Path], typer.Argument(help="Image files (JPEG/PNG/WebP).")],
    url: Annotated[str, typer.Option(help="The armdi server.")] = "http://127.0.0.1:8000",
    top_k: Annotated[int, typer.Option(help="Labels per image.")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds per request.")] = 30.0,
) -> None:
    """Classify images through a running armdi server."""
    from appliance.client import ClassifyError, classify_files

    failed = 0
    for path in images:  # one at a time: a bad file does not lose the others' answers
        try:
            result = classify_files([path], url=url, top_k=top_k, timeout=timeout)[0]
        except ClassifyError as exc:
            if "no armdi server" in str(exc):
                raise
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            failed += 1
            continue
        if as_json:
            typer.echo(json.dumps(result))
            continue
        top = result["top"][0]
        hops = " -> ".join(f"{h['node']}[{h['blocks'][0]},{h['blocks'][1]})"
                           for h in result["path"])
        typer.echo(f"{path}: {top['label']} ({top['score']:.3f})  "
                   f"{result['latency_ms']:.1f} ms  via {hops}")
    if failed:
        raise typer.Exit(1)


@app.command()
def slow(
    node: Annotated[str, typer.Argument(help="The node's name (w1, w2, ..., or source).")],
    factor: Annotated[float, typer.Argument(help="1 = full speed, 4 = four times slower.")],
    url: Annotated[str, typer.Option(help="The armdi server.")] = "http://127.0.0.1:8000",
) -> None:
    """Change a node's emulated slowdown while it runs (it computes, then waits)."""
    from appliance.client import set_slowdown

    if not 1.0 <= factor <= 1e6:
        _fail(f"factor {factor}: use 1 (full speed) up to 1e6")
    result = set_slowdown(node, factor, url=url)
    typer.echo(f"{result['node']}: slowdown {result['slowdown']:g}x (emulated)")


@app.command()
def fault(
    action: Annotated[str, typer.Argument(help="kill | pause | resume | cut")],
    node: Annotated[str, typer.Argument(help="The worker's name (w1, w2, ...).")],
    seconds: Annotated[float, typer.Option(help="How long a pause or a cut lasts.")] = 3.0,
    url: Annotated[str, typer.Option(help="The armdi server.")] = "http://127.0.0.1:8000",
) -> None:
    """Inject a fault into a worker (tests and demos): the chain routes around it."""
    from appliance.client import inject_fault

    if action not in ("kill", "pause", "resume", "cut"):
        _fail(f"fault {action!r}: use kill, pause, resume or cut")
    result = inject_fault(node, action, seconds, url=url)
    typer.echo(result["done"])


keys_app = typer.Typer(no_args_is_help=True,
                       help="Cluster keys: the HMAC key and the certificates of TLS links.")
app.add_typer(keys_app, name="keys")


@keys_app.command("init")
def keys_init(
    out: Annotated[Path, typer.Option("--out", help="Directory to write the keys to (made "
                                                    "with mode 0700).")] = Path("armdi-keys"),
    nodes: Annotated[str | None, typer.Option(
        help="Node names, e.g. source,w1,w2 (default: those of --config).")] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", help="cluster.toml: its node names, and the hosts of their addresses for "
                         "the certificates.")] = None,
    days: Annotated[int, typer.Option(help="Days the certificates are valid.")] = 3650,
) -> None:
    """Create a cluster key, a small CA and a certificate per node (private keys 0600)."""
    from appliance.keys import host_of, init_keys

    names = [n.strip() for n in nodes.split(",") if n.strip()] if nodes else []
    hosts: dict[str, list[str]] = {}
    if config is not None:
        from appliance.config import load_config

        cfg = load_config(config)
        for node_cfg in cfg.nodes:
            if not nodes:
                names.append(node_cfg.name)
            found = (host_of(node_cfg.data_addr), host_of(node_cfg.control_addr))
            hosts[node_cfg.name] = [h for h in found if h]
    if days < 1:
        _fail("--days must be at least 1")
    keys = init_keys(out, names, hosts, days=days)
    typer.echo(f"wrote the cluster key, a CA and certificates for {', '.join(names)} to "
               f"{keys.out} (private keys mode 0600; keep ca.key off the nodes)")
    typer.echo(f"add to cluster.toml (also in {keys.out / 'cluster-security.toml'}), and use "
               "tls+tcp:// addresses for TLS links:")
    typer.echo(keys.toml_snippet())


bench_app = typer.Typer(no_args_is_help=True,
                        help="Benchmarks: figures measured side by side on this machine.")
app.add_typer(bench_app, name="bench")


@bench_app.command("pipeline")
def bench_pipeline(
    model: Annotated[str, typer.Option(help="Model id in the repository (build it first with "
                                            "armdi build).")] = "efficientnet_lite0",
    requests: Annotated[int, typer.Option(help="Requests per measurement and "
                                               "repetition.")] = 200,
    repeats: Annotated[int, typer.Option(help="Repetitions; figures are their "
                                              "median.")] = 3,
    window: Annotated[int, typer.Option(help="Requests in flight when measuring "
                                             "throughput.")] = 8,
    warmup: Annotated[int, typer.Option(help="Warm-up requests per configuration.")] = 20,
    json_file: Annotated[Path | None, typer.Option("--json", help="Write the results as "
                                                                  "JSON to this file.")]
    = None,
    security: Annotated[bool, typer.Option(
        help="Also measure the 2-worker pipeline with TLS against plain TCP and with HMAC "
             "against none.")] = False,
    security_only: Annotated[bool, typer.Option(
        help="Measure only that (TLS and HMAC, side by side).")] = False,
    link: LinkOption = None,
    link_shaping: LinkShapingOption = "auto",
    repo: RepoOption = None,
) -> None:
    """Direct ONNX Runtime vs 1- and 2-worker pipelines vs raw pynng, with the ratios."""
    from appliance.bench import PipelineBenchOptions, format_report, run_pipeline_bench, write_json

    options = PipelineBenchOptions(repo=_repo_path(repo), model=model, requests=requests,
                                   repeats=repeats, window=window, warmup=warmup,
                                   security=security or security_only,
                                   security_only=security_only, link=_link(link),
                                   link_shaping=_link_shaping(link_shaping))
    signal.signal(signal.SIGTERM, _raise_interrupt)  # SIGTERM cleans up too (namespaces)
    result = run_pipeline_bench(options, progress=lambda m: typer.echo(f"... {m}", err=True))
    typer.echo(format_report(result))
    if json_file is not None:
        write_json(result, json_file)
        typer.echo(f"wrote {json_file}")


@bench_app.command("rest")
def bench_rest(
    model: Annotated[str, typer.Option(help="Model id (built first if missing).")]
    = "efficientnet_lite0",
    nodes: Annotated[int, typer.Option(help="Worker processes besides the source.")] = 2,
    mode: Annotated[str, typer.Option(help="edgepipe | armdi | local")] = "edgepipe",
    requests: Annotated[int, typer.Option(help="Requests of each kind for the overhead "
                                               "figures.")] = 300,
    clients: Annotated[str, typer.Option(help="Concurrent clients for the throughput "
                                              "figures.")] = "1,4,16",
    duration: Annotated[float, typer.Option(help="Seconds per throughput "
                                                 "measurement.")] = 3.0,
    repeats: Annotated[int, typer.Option(help="Repetitions of every throughput measurement; "
                                              "figures are their median.")] = 3,
    image: Annotated[Path | None, typer.Option(help="The JPEG to send (default: a 224x224 "
                                                    "photo).")] = None,
    json_file: Annotated[Path | None, typer.Option("--json", help="Write the results as "
                                                                  "JSON to this file.")]
    = None,
    repo: RepoOption = None,
) -> None:
    """REST end-to-end latency minus the pipeline's (p50, p99), and throughput with 1, 4 and 16
    HTTP clients against the pipeline's own, on a local cluster; JPEG decoding reported apart."""
    import logging

    from appliance.bench import machine_info
    from appliance.cluster import LocalClusterOptions, running
    from appliance.data.source import Source
    from appliance.settings import source_settings
    from engines.repository import ModelRepository
    from web.bench import RestBenchOptions, format_report, run_rest_bench

    try:
        counts = tuple(int(c) for c in clients.split(","))
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        _fail(f"--clients {clients!r}: give positive counts, e.g. 1,4,16")
    if mode not in ("armdi", "edgepipe", "local"):
        _fail(f"--mode {mode!r}: use edgepipe, armdi or local")
    root = _repo_path(repo)
    if not ModelRepository(root).has_model(model):
        typer.echo(f"{model} is not built in {root}; building it first")
        build(model=model, repo=root)
    options = LocalClusterOptions(
        model=model, repo=root, nodes=nodes, mode="local" if nodes == 0 else mode, port=0,
        log_level=logging.getLevelName(logging.getLogger().level))
    bench_options = RestBenchOptions(requests=requests, clients=counts, duration_s=duration,
                                     repeats=repeats, image=image)
    with running(options) as (_cluster, cfg):
        source = Source(source_settings(cfg))
        try:
            source.start()
            result = run_rest_bench(source, bench_options,
                                    progress=lambda m: typer.echo(f"... {m}", err=True))
            boundaries = source.allocation.boundaries if source.allocation else ()
        finally:
            source.close()
    result["cluster"] = {"nodes": nodes, "mode": options.mode, "boundaries": list(boundaries)}
    result["machine"] = machine_info()
    typer.echo(format_report(result))
    if json_file is not None:
        json_file.parent.mkdir(parents=True, exist_ok=True)
        json_file.write_text(json.dumps(result, indent=1, default=str) + "\n")
        typer.echo(f"wrote {json_file}")


@bench_app.command("adaptive")
def bench_adaptive(
    model: Annotated[str, typer.Option(help="Model id (build it first).")]
    = "efficientnet_lite0",
    workers: Annotated[int, typer.Option(help="Workers in the chain.")] = 3,
    duration: Annotated[float, typer.Option(help="Seconds per run.")] = 40.0,
    real: Annotated[bool, typer.Option("--real", help="Real compute instead of emulated "
                                                      "(workers share this machine's cores)."
                                       )] = False,
    time_scale: Annotated[float, typer.Option(help="Emulated compute: profiled times x this."
                                              )] = 4.0,
    modes: Annotated[str, typer.Option(help="Comma-separated: armdi,edgepipe,equal.")]
    = "armdi,edgepipe,equal",
    scenarios: Annotated[str, typer.Option(
        help="Comma-separated: a (static 1x/2x/4x), bc (a worker 1x -> 4x -> 1x), he (two "
             "identical workers at rest, emulated with the fused segments' measured times), "
             "h (the same, one core each, real compute).")] = "a,bc,he,h",
    hysteresis: Annotated[float | None, typer.Option(
        help="The controller's hysteresis (default: the config's, 0.02).")] = None,
    json_file: Annotated[Path | None, typer.Option("--json", help="Write the results as JSON "
                                                                  "(and a PNG plot beside it)."
                                                   )] = None,
    repo: RepoOption = None,
) -> None:
    """AR-MDI vs EdgePipe vs an equal split through heterogeneity and a slowdown at run time."""
    from appliance.bench import write_json
    from appliance.bench_adaptive import (
        MODES,
        SCENARIOS,
        AdaptiveBenchOptions,
        format_report,
        run_adaptive_bench,
        write_plot,
    )

    chosen = tuple(m.strip() for m in modes.split(",") if m.strip())
    if not chosen or any(m not in MODES for m in chosen):
        _fail(f"--modes {modes!r}: choose from {', '.join(MODES)}")
    picked = tuple(m.strip() for m in scenarios.split(",") if m.strip())
    if not picked or any(m not in SCENARIOS for m in picked):
        _fail(f"--scenarios {scenarios!r}: choose from {', '.join(SCENARIOS)}")
    change, back = duration / 4, duration * 5 / 8
    options = AdaptiveBenchOptions(repo=_repo_path(repo), model=model, workers=workers,
                                   duration_s=duration, change_s=change, back_s=back,
                                   emulate=not real, time_scale=time_scale, modes=chosen,
                                   scenarios=picked, hysteresis=hysteresis)
    result = run_adaptive_bench(options, progress=lambda m: typer.echo(f"... {m}", err=True))
    typer.echo(format_report(result))
    if json_file is not None:
        write_json(result, json_file)
        png = json_file.with_suffix(".png")
        typer.echo(f"wrote {json_file}" + (f" and {png}" if write_plot(result, png) else
                                           " (no plot: pip install 'armdi[bench]')"))


@bench_app.command("faults")
def bench_faults(
    model: Annotated[str, typer.Option(help="Model id (build it first).")]
    = "efficientnet_lite0",
    duration: Annotated[float, typer.Option(help="Seconds per run (the fault at 4 s).")] = 14.0,
    modes: Annotated[str, typer.Option(help="Comma-separated: armdi,edgepipe.")]
    = "armdi,edgepipe",
    emulate: Annotated[bool, typer.Option(
        "--emulate", help="Emulated compute (each node waits its blocks' profiled time x "
                          "--time-scale): four workers then run in parallel faithfully on few "
                          "cores; answers are zeros, so 'wrong' is not checked.")] = False,
    time_scale: Annotated[float, typer.Option(help="With --emulate: profiled times x this.")
                          ] = 4.0,
    json_file: Annotated[Path | None, typer.Option("--json", help="Write the results as "
                                                                  "JSON.")] = None,
    repo: RepoOption = None,
) -> None:
    """Kill, pause and restart workers of a 4-worker cluster under load; count every request."""
    from appliance.bench import write_json
    from appliance.bench_faults import FaultBenchOptions, format_report, run_fault_bench

    chosen = tuple(m.strip() for m in modes.split(",") if m.strip())
    if not chosen or any(m not in ("armdi", "edgepipe") for m in chosen):
        _fail(f"--modes {modes!r}: choose from armdi, edgepipe")
    options = FaultBenchOptions(repo=_repo_path(repo), model=model, duration_s=duration,
                                modes=chosen, emulate=emulate, time_scale=time_scale,
                                window=8 if emulate else 4)
    result = run_fault_bench(options, progress=lambda m: typer.echo(f"... {m}", err=True))
    typer.echo(format_report(result))
    if json_file is not None:
        write_json(result, json_file)
        typer.echo(f"wrote {json_file}")


@bench_app.command("mdi-vs-ddi")
def bench_mdi_vs_ddi(
    json_file: Annotated[Path | None, typer.Option("--json", help="Write the results as "
                                                                  "JSON.")] = None,
    quick: Annotated[bool, typer.Option(
        "--quick", help="A subset that runs in minutes: mobilenet_v2 and vgg16, 224 and 32, "
                        "20 and 1000 Mbit/s, 3 workers.")] = False,
    models: Annotated[str | None, typer.Option(
        help="Comma-separated models (default vgg16,mobilenet_v2,efficientnet_lite0); built "
             "with random weights when missing.")] = None,
    sizes: Annotated[str | None, typer.Option(
        help="Input sizes, N or HxW, e.g. 224,32,720x1280 (a camera frame; fully "
             "convolutional models only).")] = None,
    links: Annotated[str | None, typer.Option(help="Link rates in Mbit/s, e.g. "
                                                   "20,50,100,1000.")] = None,
    workers: Annotated[str | None, typer.Option(help="Worker counts, e.g. 2,3,4.")] = None,
    modes: Annotated[str | None, typer.Option(
        help="Comma-separated: armdi,edgepipe,ddi,hybrid,local,auto (and ddi_jpeg).")] = None,
    memory: Annotated[str | None, typer.Option(
        help="Per-worker memory budgets as fractions of the model, e.g. 1,0.5 (below 1, "
             "ddi and local cannot run; the chains respect the cap).")] = None,
    slow: Annotated[str | None, typer.Option(
        help="How many times slower the last worker is, e.g. 1,4 (one slow device; 1: all "
             "alike).")] = None,
    wire_dtypes: Annotated[str, typer.Option(help="MDI wire: float32,float16.")]
    = "float32,float16",
    images: Annotated[int | None, typer.Option(help="Images per measurement.")] = None,
    window: Annotated[int, typer.Option(help="Requests in flight.")] = 8,
    time_scale: Annotated[float, typer.Option(help="Emulated compute: profiled times x "
                                                   "this.")] = 1.0,
    link: Annotated[str, typer.Option(help="Where the links come from: transport (a rate "
                                           "limit in the transport) | tc (shaped veths "
                                           "between network namespaces, as root; else the "
                                           "transport's limit).")] = "transport",
    calibrate: Annotated[bool, typer.Option(
        help="Measure the runtime's per-request cost first and add it to the "
             "prediction.")] = True,
    repo: RepoOption = None,
) -> None:
    """MDI (armdi, edgepipe) vs DDI vs local, measured beside the analytical prediction."""
    from appliance.bench import write_json
    from appliance.bench_mdi_ddi import (
        QUICK,
        MdiDdiOptions,
        format_report,
        parse_size,
        run_mdi_ddi_bench,
    )

    def listed(text: str | None, kind: type[Any]) -> tuple[Any, ...] | None:
        if text is None:
            return None
        try:
            return tuple(kind(v.strip()) for v in text.split(",") if v.strip())
        except ValueError:
            _fail(f"{text!r}: expected comma-separated {kind.__name__} values")
            raise  # (unreachable: _fail exits)

    chosen: dict[str, Any] = dict(QUICK) if quick else {}
    try:
        parsed_sizes = None if sizes is None else tuple(
            parse_size(v.strip()) for v in sizes.split(",") if v.strip())
    except ArmdiError as exc:
        _fail(str(exc))
    for key, value in (("models", listed(models, str)), ("sizes", parsed_sizes),
                       ("links_mbps", listed(links, float)), ("workers", listed(workers, int)),
                       ("modes", listed(modes, str)), ("memory", listed(memory, float)),
                       ("slow", listed(slow, float)),
                       ("wire_dtypes", listed(wire_dtypes, str)), ("images", images)):
        if value is not None:
            chosen[key] = value
    options = MdiDdiOptions(repo=_repo_path(repo), window=window, time_scale=time_scale,
                            link=link, calibrate=calibrate, **chosen)
    result = run_mdi_ddi_bench(options, progress=lambda m: typer.echo(f"... {m}", err=True))
    result["command"] = "armdi " + shlex.join(sys.argv[1:])  # as typed (the report shows it)
    typer.echo(format_report(result))
    if json_file is not None:
        write_json(result, json_file)
        typer.echo(f"wrote {json_file}")


@bench_app.command("report")
def bench_report(
    out: Annotated[Path, typer.Option(help="The Markdown page to write.")]
    = Path("docs/benchmarks.md"),
    results: Annotated[Path, typer.Option(help="Where the benches' JSON files are "
                                               "(pipeline.json, adaptive.json, faults.json, "
                                               "mdi-vs-ddi.json).")] = Path("docs/results"),
    template: Annotated[Path, typer.Option(help="The page's prose, with {{placeholders}} "
                                                "for the generated tables and plots.")]
    = Path("docs/benchmarks.template.md"),
    plots: Annotated[Path | None, typer.Option(help="Where the PNGs go (default: plots/ "
                                                    "beside --out).")] = None,
) -> None:
    """One Markdown page with PNG plots from the JSON of every bench (runs no bench)."""
    from appliance.report import ReportOptions, generate

    report = generate(ReportOptions(results=results, template=template, out=out, plots=plots))
    for name in report.missing:
        typer.echo(f"note: no {name} in {results}: its section says so")
    typer.echo(f"wrote {out}" + (f" and {len(report.plots)} plots: "
                                 + ", ".join(str(p) for p in report.plots)
                                 if report.plots else ""))


def main() -> None:
    try:
        app()
    except ArmdiError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
