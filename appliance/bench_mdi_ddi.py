"""``armdi bench mdi-vs-ddi``: model distribution against data distribution, each
measurement next to its analytical prediction (``appliance.control.predict``).

For every model, input size, link rate, worker count and mode, a local cluster of its own
infers N images with ``window`` of them in flight (a closed loop), and the bench records the
time for the N images, the throughput (N / that time) and the p50/p99 latency (submission to
result, at the source), beside what the prediction says for the same case.

- Modes: ``armdi`` and ``edgepipe`` (one MDI chain, placed at the allocator's exact optimum
  for uint8 pixel inputs; ``armdi`` then adapts), each with the float32 and the float16
  wire; ``ddi`` (whole uint8 images to the worker that would finish first); ``ddi_jpeg``
  (the JPEG bytes instead, decoded on the worker; a variant, not in the default set);
  ``hybrid`` (DDI over
  chains, at the chain length the prediction rates best; 3 workers or more); ``local`` (one
  device runs everything: one emulated worker on a free link); ``auto`` (the source's mode
  auto, which picks ddi, an armdi chain or hybrid from the prediction; its choice is in each
  cell's ``auto_choice``: here the source runs no blocks, so running everything on the
  source is not one of its alternatives, and the summary's ``auto`` compares it with the
  best of armdi, edgepipe and ddi (the paper's modes), with hybrid, and with local).
- **Memory budgets** (``memory``): per worker, the fraction of the model's blocks its memory
  holds (1: the whole model). Below 1, ``ddi`` and ``local`` cannot run (no device holds the
  model) and are not measured; the chains respect the cap (``max_blocks``).
- **A slow device** (``slow``): the last worker is this many times slower than the others
  (its emulated compute; 1: all alike). DDI gives it fewer whole requests (the source's
  pick), a chain fewer blocks.
- The source owns the images and runs no blocks: N workers are N compute devices.
- **Compute is emulated**: each node waits its blocks' profiled time (times ``time_scale``)
  instead of computing, so 3-4 workers run faithfully on 2 cores. JPEG decoding in
  ``ddi_jpeg`` is really done.
- **Links are emulated in the transport** (``link = "transport"``, ``[cluster]
  emulate_links``): each node's sends occupy its outgoing link for size / rate, one after
  another. ``link = "tc"`` shapes them instead (``appliance.netlinks``: network namespaces,
  veth pairs, tc tbf; as root, else the transport's rate limit, and each cell says which).
- **The runtime's own cost** per request (Python, frames, NNG: ~1 ms on a busy 2-core
  machine, against sub-millisecond compute at 32x32) is measured first, per model and size:
  a 1-worker cluster with compute scaled to nothing, N images; N / its time is the cost at
  the busier node. The prediction adds it at every node (``overhead_ms``); ``calibrate =
  False`` leaves it out.
- Models missing from the repository are built first, with random weights (emulated compute
  needs only their profile); other input sizes as ``MODEL_SIZE`` (``armdi build MODEL --name
  MODEL_SIZE --input-size SIZE``), non-square ones (a 720p camera frame: ``720x1280``) as
  ``MODEL_HxW``; a model that cannot take a size (efficientnet_lite0 is square only) is
  skipped, and the result's ``skipped`` says why.

A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import dataclasses
import io
import math
import statistics
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from appliance.bench import _quantile, load_avg, machine_info
from appliance.control.auto import choose
from appliance.control.predict import Prediction, Scenario, mdi_allocation, predict
from engines.device import device_signature
from engines.errors import ArmdiError
from engines.manifest import Manifest
from engines.repository import ModelRepository

MODES = ("armdi", "edgepipe", "ddi", "ddi_jpeg", "hybrid", "local", "auto")
DEFAULT_MODES = ("armdi", "edgepipe", "ddi", "hybrid", "local", "auto")
WHOLE_MODEL_MODES = ("ddi", "ddi_jpeg", "local")  # a device holds the whole model
LINKS = ("transport", "tc")  # where the links come from
LINK_LABEL = "links emulated in the transport"
TC_LABEL = ("links shaped with tc tbf between network namespaces where root allows, else "
            "emulated in the transport (each cell's link_note says which)")
LOOPBACK_LATENCY_MS = 0.1  # per message between processes on this machine (pynng, measured)


Size = int | tuple[int, int]


def hw(size: Size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else size


def size_label(size: Size) -> str:
    h, w = hw(size)
    return f"{h}x{w}"


def size_key(size: Size) -> int | str:
    """As the JSON records it: N for a square input, "HxW" otherwise."""
    h, w = hw(size)
    return h if h == w else f"{h}x{w}"


def parse_size(text: str) -> Size:
    """``224`` or ``720x1280``."""
    parts = text.lower().split("x")
    try:
        values = [int(v) for v in parts]
    except ValueError as exc:
        raise ArmdiError(f"--sizes: {text!r} is not N or HxW") from exc
    if len(values) == 1 or (len(values) == 2 and values[0] == values[1]):
        return values[0]
    if len(values) != 2:
        raise ArmdiError(f"--sizes: {text!r} is not N or HxW")
    return (values[0], values[1])


@dataclass(frozen=True)
class MdiDdiOptions:
    repo: Path
    models: tuple[str, ...] = ("vgg16", "mobilenet_v2", "efficientnet_lite0")
    sizes: tuple[Size, ...] = (224, 32)  # N (square) or (H, W)
    links_mbps: tuple[float, ...] = (20.0, 50.0, 100.0, 1000.0)
    workers: tuple[int, ...] = (2, 3, 4)
    modes: tuple[str, ...] = DEFAULT_MODES
    wire_dtypes: tuple[str, ...] = ("float32", "float16")  # for the MDI modes
    images: int = 40
    window: int = 8
    warmup: int = 4
    time_scale: float = 1.0  # emulated compute: profiled times x this
    link: str = "transport"
    build_missing: bool = True
    request_timeout_s: float = 120.0
    calibrate: bool = True  # measure the runtime's per-request cost; the prediction adds it
    memory: tuple[float, ...] = (1.0,)  # per-worker memory budgets, fractions of the model
    slow: tuple[float, ...] = (1.0,)  # the last worker this many times slower (1: alike)


QUICK = {"models": ("mobilenet_v2", "vgg16"), "sizes": (224, 32), "links_mbps": (20.0, 1000.0),
         "workers": (3,), "images": 24}
"""``--quick``: a subset that runs in minutes (two models, both sizes, a slow and a fast link,
three workers, every default mode and wire)."""


def check_options(o: MdiDdiOptions) -> None:
    """Refuse bad options before anything starts, naming the option."""
    bad = [m for m in o.modes if m not in MODES]
    if not o.modes or bad:
        raise ArmdiError(f"--modes: choose from {', '.join(MODES)} (got {', '.join(bad)})")
    if o.link not in LINKS:
        raise ArmdiError(f"--link {o.link!r}: choose from {', '.join(LINKS)}")
    if not o.wire_dtypes or any(d not in ("float32", "float16") for d in o.wire_dtypes):
        raise ArmdiError("--wire-dtypes: float32 and/or float16")
    if not o.workers or any(w < 1 for w in o.workers):
        raise ArmdiError("--workers: counts of 1 or more")
    if not o.links_mbps or any(not (math.isfinite(r) and r > 0) for r in o.links_mbps):
        raise ArmdiError("--links: rates in Mbit/s above 0")
    if not o.sizes or any(min(hw(s)) < 8 for s in o.sizes):
        raise ArmdiError("--sizes: input sizes of 8 pixels or more")
    if o.images < 1 or o.window < 1 or o.warmup < 0:
        raise ArmdiError("--images and --window must be 1 or more")
    if not o.time_scale > 0:
        raise ArmdiError("--time-scale must be above 0")
    if not o.memory or any(not (math.isfinite(m) and 0 < m <= 1) for m in o.memory):
        raise ArmdiError("--memory: fractions of the model each worker holds, above 0 and "
                         "at most 1")
    if not o.slow or any(not (math.isfinite(f) and f >= 1) for f in o.slow):
        raise ArmdiError("--slow: factors of 1 or more (the last worker that many times "
                         "slower)")


def model_for(repository: ModelRepository, model: str, size: Size, build_missing: bool,
              say: Callable[[str], None]) -> Manifest:
    """The built model at ``size``: ``model`` itself when built at that size, else
    ``model_SIZE`` (``model_HxW``), built first when missing (random weights) and allowed."""
    h, w = hw(size)
    suffix = str(h) if h == w else f"{h}x{w}"
    for model_id in (model, f"{model}_{suffix}"):
        if repository.has_model(model_id):
            manifest = repository.load_manifest(model_id)
            if tuple(manifest.input.shape[2:]) == (h, w):
                return manifest
    model_id = model if (h, w) == (224, 224) else f"{model}_{suffix}"
    if not build_missing:
        raise ArmdiError(f"{model} at {h}x{w} is not built in {repository.root}: armdi "
                         f"build {model} --name {model_id} --input-size {suffix} "
                         "--weights random")
    from builder.build import BuildOptions, build

    say(f"building {model_id} ({h}x{w}, random weights: the bench needs its profile)")
    build(BuildOptions(model=model, repo=repository.root, weights="random", name=model_id,
                       input_size=None if (h, w) == (224, 224) else h,
                       input_width=None if h == w else w, segments="blocks",
                       backend="ort", profile_segments=0, profile_repeats=10))
    return repository.load_manifest(model_id)


def sample_jpeg(size: Size) -> bytes:
    """A smooth synthetic photo-like image at ``size`` (JPEG, quality 90): noise would not
    compress, a real camera frame does."""
    from PIL import Image

    h, w = hw(size)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    y, x = y / max(h - 1, 1), x / max(w - 1, 1)
    rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x * y)], axis=-1) * 255
    buffer = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _decode_ms(image: bytes, manifest: Manifest) -> float:
    from engines.preprocess import decode_image, pixels

    times = []
    for _ in range(15):
        t0 = time.perf_counter()
        pixels(decode_image(image), manifest.preprocessing)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def cap_for(blocks: int, memory: float) -> int | None:
    """The most blocks a worker with ``memory`` (a fraction of the model) holds; None: all."""
    return None if memory >= 1 else max(1, math.floor(blocks * memory + 1e-9))


def speeds_for(workers: int, slow: float) -> tuple[float, ...]:
    """Every worker's slowdown: the last one ``slow`` times slower than the others."""
    return (1.0,) * (workers - 1) + (slow,) if workers else ()


def scenario_for(manifest: Manifest, o: MdiDdiOptions, *, workers: int, link_mbps: float | None,
                 wire_dtype: str = "float32", jpeg: bytes | None = None,
                 decode_ms: float = 0.0, overhead_ms: float = 0.0,
                 cap: int | None = None, slow: float = 1.0) -> Scenario:
    profile = manifest.profile_for(device_signature(), "ort")
    if profile is None:
        raise ArmdiError(f"{manifest.model_id} has no profile; rebuild it")
    return Scenario(
        block_ms=tuple(t * o.time_scale for t in profile.block_ms),
        activation_bytes=tuple(manifest.activation_bytes()),
        link_Bps=math.inf if link_mbps is None else link_mbps * 1e6 / 8,
        latency_ms=LOOPBACK_LATENCY_MS, speeds=speeds_for(workers, slow),
        input_bytes=len(jpeg) if jpeg is not None else None, wire_dtype=wire_dtype,
        decode_ms=decode_ms, overhead_ms=overhead_ms,
        max_blocks=None if cap is None else (cap,) * workers)


def calibrate_overhead(o: MdiDdiOptions, manifest: Manifest) -> float:
    """The runtime's per-request cost (ms) at its busier node: one worker, compute scaled to
    nothing, no link, ``window`` in flight."""
    quiet = dataclasses.replace(o, time_scale=1e-6)
    none = Prediction("ddi", 1, 1.0, 1.0, 1.0, 1.0, 1.0)
    images = max(o.images, 20)
    measured = _run(dataclasses.replace(quiet, images=images), manifest, "local", 1, None,
                    "float32", None, none, None, 1.0)
    return float(measured["time_s"]) * 1000 / images


def _run(o: MdiDdiOptions, manifest: Manifest, mode: str, workers: int,
         link_mbps: float | None, wire_dtype: str, jpeg: bytes | None,
         prediction: Prediction, cap: int | None, slow: float,
         chain_workers: int = 2) -> dict[str, Any]:
    """One cluster, N images through it; the measured figures."""
    from appliance.cluster import LocalClusterOptions, running
    from appliance.data.source import Source
    from appliance.netlinks import LinkSpec
    from appliance.settings import source_settings

    shaped = o.link == "tc" and link_mbps is not None
    options = LocalClusterOptions(
        model=manifest.model_id, repo=o.repo, nodes=workers,
        mode="ddi" if mode in ("ddi", "ddi_jpeg", "local") else mode,  # auto: the source's
        ddi_input="jpeg" if mode == "ddi_jpeg" else "pixels", wire_dtype=wire_dtype, port=0,
        chain_workers=chain_workers, max_blocks=(cap,) * workers,
        slowdown=speeds_for(workers, slow),
        source_runs_blocks=False, emulate_compute=True, emulate_scale=o.time_scale,
        link_mbps=None if shaped else link_mbps, request_timeout_s=o.request_timeout_s,
        link=LinkSpec(rate_bps=link_mbps * 1e6) if shaped and link_mbps else None)
    shape = (1, *manifest.input.shape[1:])
    x = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    with running(options) as (cluster, config):
        link_note = cluster.link_note if shaped else (
            LINK_LABEL if link_mbps is not None else "no link (loopback)")
        settings = source_settings(config)
        if mode in ("armdi", "edgepipe"):  # the optimum for uint8 inputs, as predicted
            settings = dataclasses.replace(settings, boundaries=prediction.boundaries)
        source = Source(settings)
        try:
            source.start()

            def submit() -> Future[Any]:
                return source.submit_image(jpeg) if jpeg is not None else source.submit(x)

            _closed_loop(submit, o.warmup, o.window, o.request_timeout_s)
            t0 = time.perf_counter()
            latencies = _closed_loop(submit, o.images, o.window, o.request_timeout_s)
            elapsed = time.perf_counter() - t0
            status = source.status()
            boundaries = list(source.boundaries())
        finally:
            source.close()
    chosen = {"auto_choice": status.mode,
              "auto_reason": (status.auto or {}).get("reason", "")} if mode == "auto" else {}
    if mode == "hybrid":
        chosen = {"chain_workers": chain_workers}
    return {**chosen, "time_s": round(elapsed, 4), "throughput_ips": round(o.images / elapsed, 3),
            "latency_p50_ms": round(_quantile(latencies, 0.5), 3),
            "latency_p99_ms": round(_quantile(latencies, 0.99), 3),
            "failed": status.failed, "retried": status.retried,
            "deaths": status.counters.get("deaths", 0), "boundaries": boundaries,
            "link_note": link_note}


def _closed_loop(submit: Callable[[], Future[Any]], n: int, window: int,
                 timeout_s: float) -> list[float]:
    """``n`` requests, at most ``window`` in flight, a new one as soon as any finishes (as
    independent clients, and the prediction, do: waiting for the oldest instead would hold
    fast workers idle behind a slow one's request in ddi and hybrid); each one's latency
    (ms) as the source saw it."""
    inflight: set[Future[Any]] = set()
    latencies: list[float] = []
    submitted = 0
    while submitted < n or inflight:
        while submitted < n and len(inflight) < window:
            inflight.add(submit())
            submitted += 1
        done, inflight = wait(inflight, timeout=timeout_s, return_when=FIRST_COMPLETED)
        if not done:
            raise ArmdiError(f"no result within {timeout_s:g} s ({len(inflight)} in flight)")
        latencies += [f.result().latency_ms for f in done]
    return latencies


Case = tuple[str, int, "float | None", str, float, float]


def _cases(o: MdiDdiOptions) -> list[Case]:
    """(mode, workers, link Mbit/s or None, wire dtype, memory, slow) for one model and
    size."""
    cases: list[Case] = []
    if "local" in o.modes and any(m >= 1 for m in o.memory):
        cases.append(("local", 1, None, "float32", 1.0, 1.0))
    for slow in o.slow:
        for memory in o.memory:
            for link in o.links_mbps:
                for workers in o.workers:
                    for mode in o.modes:
                        if memory < 1 and mode in WHOLE_MODEL_MODES:
                            continue  # no device holds the whole model
                        if mode == "hybrid" and workers < 3:
                            continue  # chains of 2 or more, at least two of them
                        if mode in ("armdi", "edgepipe"):
                            cases += [(mode, workers, link, d, memory, slow)
                                      for d in o.wire_dtypes]
                        elif mode != "local":
                            cases.append((mode, workers, link, "float32", memory, slow))
    return cases


def run_mdi_ddi_bench(o: MdiDdiOptions,
                      progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    say = progress or (lambda _m: None)
    check_options(o)
    repository = ModelRepository(o.repo)
    load_start = load_avg()
    rows: list[dict[str, Any]] = []
    calibration: dict[str, dict[str, float]] = {}
    skipped: list[dict[str, Any]] = []
    for model in o.models:
        for size in o.sizes:
            try:
                manifest = model_for(repository, model, size, o.build_missing, say)
            except ArmdiError as exc:
                if hw(size)[0] == hw(size)[1] or "not built" in str(exc):
                    raise
                skipped.append({"model": model, "size": size_key(size), "why": str(exc)})
                say(f"skipping {model} at {size_label(size)}: {exc}")
                continue
            jpeg = sample_jpeg(size) if "ddi_jpeg" in o.modes else None
            decode = _decode_ms(jpeg, manifest) if jpeg is not None else 0.0
            overhead = calibrate_overhead(o, manifest) if o.calibrate else 0.0
            calibration[manifest.model_id] = {"overhead_ms": round(overhead, 3),
                                              "decode_ms": round(decode, 3)}
            say(f"{manifest.model_id}: runtime overhead {overhead:.2f} ms per request")
            for mode, workers, link, dtype, memory, slow in _cases(o):
                image = jpeg if mode == "ddi_jpeg" else None
                cap = cap_for(manifest.blocks, memory)
                if cap is not None and cap * workers < manifest.blocks:
                    why = (f"{workers} workers holding {cap} blocks each cannot hold the "
                           f"{manifest.blocks} blocks (memory {memory:g})")
                    entry = {"model": model, "size": size_key(size), "workers": workers,
                             "memory": memory, "why": why}
                    if entry not in skipped:  # said once per condition
                        skipped.append(entry)
                        say(f"skipping {manifest.model_id}: {why}")
                    continue  # no mode can run it
                scenario = scenario_for(manifest, o, workers=workers, link_mbps=link,
                                        wire_dtype=dtype, jpeg=image,
                                        decode_ms=decode if image else 0.0,
                                        overhead_ms=overhead, cap=cap, slow=slow)
                kind, length = ("ddi" if mode == "ddi_jpeg" else mode), 2
                if mode in ("auto", "hybrid"):  # what auto chooses (the source runs no blocks)
                    decision = choose(scenario, worker_max_blocks=(cap,) * workers,
                                      source_runs_blocks=False)
                    hybrid = next(a for a in decision.alternatives if a.mode == "hybrid")
                    if mode == "hybrid" and not hybrid.feasible:
                        continue
                    kind = decision.mode if mode == "auto" else "hybrid"
                    length = (decision if mode == "auto" else hybrid).chain_workers or 2
                    scenario = dataclasses.replace(scenario, chain_workers=length)
                predicted = predict(kind, scenario, o.images, o.window)
                label = (f"{manifest.model_id} {size_label(size)} {mode} {dtype} x{workers} "
                         f"@ {'no link' if link is None else f'{link:g} Mbit/s'}"
                         + (f", memory {memory:g} ({cap} blocks)" if cap else "")
                         + (f", w{workers} {slow:g}x slower" if slow != 1 else ""))
                say(label)
                measured = _run(o, manifest, mode, workers, link, dtype, image, predicted, cap,
                                slow, length)
                rows.append({
                    "model": model, "model_id": manifest.model_id, "size": size_key(size),
                    "mode": mode,
                    "workers": workers, "link_mbps": link, "wire_dtype": dtype,
                    "memory": memory, "max_blocks": cap, "slow": slow,
                    "input_bytes": scenario.wire_input_bytes, "images": o.images, **measured,
                    "predicted": predicted.to_dict(),
                    "time_ratio": round(measured["time_s"] / predicted.time_s, 3)
                    if predicted.time_s > 0 else None})
    return {
        "bench": "mdi-vs-ddi",
        "machine": machine_info(), "load_avg_start": load_start, "load_avg_end": load_avg(),
        "links": LINK_LABEL if o.link == "transport" else TC_LABEL,
        "emulation": (f"emulated compute: each node waits its blocks' profiled time x "
                      f"{o.time_scale:g} instead of computing; "
                      f"{LINK_LABEL if o.link == 'transport' else TC_LABEL}"),
        "options": {"models": list(o.models), "sizes": [size_key(z) for z in o.sizes],
                    "links_mbps": list(o.links_mbps), "workers": list(o.workers),
                    "modes": list(o.modes), "wire_dtypes": list(o.wire_dtypes),
                    "images": o.images, "window": o.window, "time_scale": o.time_scale,
                    "memory": list(o.memory), "slow": list(o.slow)},
        "calibration": calibration,
        "skipped": skipped,
        "cells": rows,  # (the name armdi bench report reads)
        "winners": winners(rows),
        "auto": auto_summary(rows),
    }


def _key(r: dict[str, Any]) -> tuple[Any, ...]:
    """A cell's condition: model, size, link, workers, memory budget (1: none) and how
    much slower the last worker is (1: alike)."""
    return (r["model_id"], r["size"], r["link_mbps"], r["workers"], r.get("memory", 1.0),
            r.get("slow", 1.0))


def _name(r: dict[str, Any]) -> str:
    return f"{r['mode']}{'/f16' if r['wire_dtype'] == 'float16' else ''}"


PAPER_MODES = ("armdi", "edgepipe", "ddi")


def auto_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per condition with an ``auto`` cell: its throughput over the best of the paper's
    distributed modes (armdi, edgepipe, ddi), over hybrid's, over local's (where a device
    holds the whole model); the worst of the first, and how often it beat them all."""
    local = {r["model_id"]: r for r in rows if r["mode"] == "local"}
    cells = []
    for a in (r for r in rows if r["mode"] == "auto"):
        here = [r for r in rows if _key(r) == _key(a)]
        others = [r for r in here if r["mode"] in PAPER_MODES]
        hybrid = [r for r in here if r["mode"] == "hybrid"]
        if not others:
            continue
        best = max(others, key=lambda r: r["throughput_ips"])
        lo = local.get(a["model_id"]) if a.get("memory", 1.0) >= 1 else None
        h = max(hybrid, key=lambda r: r["throughput_ips"]) if hybrid else None
        cells.append({"model_id": a["model_id"], "size": a["size"], "link_mbps": a["link_mbps"],
                      "workers": a["workers"], "memory": a.get("memory", 1.0),
                      "slow": a.get("slow", 1.0),
                      "chose": a.get("auto_choice"), "best_other": _name(best),
                      "ratio_to_best": round(a["throughput_ips"] / best["throughput_ips"], 3),
                      "ratio_to_hybrid": round(a["throughput_ips"] / h["throughput_ips"], 3)
                      if h else None,
                      "ratio_to_local": round(a["throughput_ips"] / lo["throughput_ips"], 3)
                      if lo else None})
    ratios = [c["ratio_to_best"] for c in cells]
    return {"cells": cells, "min_ratio_to_best": min(ratios) if ratios else None,
            "beats_all": sum(1 for c in cells if c["ratio_to_best"] > 1.0
                             and (c["ratio_to_local"] is None or c["ratio_to_local"] > 1.0))}


def winners(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per condition: the fastest mode measured and predicted (``local`` competes wherever a
    device holds the whole model; it needs no link; ``auto`` runs one of the others and is
    summarised apart, ``auto_summary``)."""
    local = {(r["model_id"]): r for r in rows if r["mode"] == "local"}
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        if r["mode"] not in ("local", "auto"):
            groups.setdefault(_key(r), []).append(r)
    out = []
    for (model_id, size, link, workers, memory, slow), group in groups.items():
        contenders = group + ([local[model_id]] if model_id in local and memory >= 1 else [])
        best_m = min(contenders, key=lambda r: r["time_s"])
        best_p = min(contenders, key=lambda r: r["predicted"]["time_s"])
        out.append({"model_id": model_id, "size": size, "link_mbps": link, "workers": workers,
                    "memory": memory, "slow": slow, "measured": _name(best_m),
                    "predicted": _name(best_p)})
    return out


def _condition(c: dict[str, Any]) -> str:
    """", memory 0.5, w4 4x slower": what sets a condition apart, beyond the defaults."""
    memory = f", memory {c['memory']:g}" if c.get("memory", 1.0) < 1 else ""
    slow = f", last worker {c['slow']:g}x slower" if c.get("slow", 1.0) != 1 else ""
    return memory + slow


def format_report(result: dict[str, Any]) -> str:
    calibration = ", ".join(f"{k} {v['overhead_ms']:.2f}"
                            for k, v in result["calibration"].items())
    lines = [f"armdi bench mdi-vs-ddi: {result['emulation']}",
             f"runtime overhead per request (ms, measured, added to the prediction): "
             f"{calibration or 'not measured'}",
             f"{result['machine']['cpu_count']} cores ({result['machine']['cpu_model']}), "
             f"load {result['load_avg_start']} -> {result['load_avg_end']}",
             "time for N images, throughput and latency: measured / predicted", "",
             f"{'model':<22}{'mode':<14}{'wk':>3}{'Mbit/s':>8}  {'time s':>15}  "
             f"{'images/s':>15}  {'p50 ms':>17}  {'p99 ms':>8}  {'meas/pred':>9}"]
    for r in result["cells"]:
        m, p = r, r["predicted"]
        mode = _name(r) + (f" m{r['memory']:g}" if r.get("memory", 1.0) < 1 else "") + (
            f" s{r['slow']:g}" if r.get("slow", 1.0) != 1 else "")
        link = "-" if r["link_mbps"] is None else f"{r['link_mbps']:g}"
        lines.append(
            f"{r['model_id']:<22}{mode:<14}{r['workers']:>3}{link:>8}  "
            f"{m['time_s']:>7.2f}/{p['time_s']:<7.2f}  "
            f"{m['throughput_ips']:>7.1f}/{p['throughput_ips']:<7.1f}  "
            f"{m['latency_p50_ms']:>8.1f}/{p['latency_p50_ms']:<8.1f}  "
            f"{m['latency_p99_ms']:>8.1f}  {r['time_ratio']:>9}")
    auto = result.get("auto") or {}
    if auto.get("cells"):
        lines += ["", "mode auto (throughput over the best of armdi/edgepipe/ddi, over hybrid, "
                  "over local):"]
        for c in auto["cells"]:
            memory = _condition(c)
            lines.append(f"  {c['model_id']:<22} x{c['workers']} @ {c['link_mbps']:g} Mbit/s"
                         f"{memory}: chose {c['chose']}, x{c['ratio_to_best']} of "
                         f"{c['best_other']}, x{c['ratio_to_hybrid']} of hybrid, "
                         f"x{c['ratio_to_local']} of local")
    if result["winners"]:
        lines += ["", "fastest mode (measured / predicted):"]
        for w in result["winners"]:
            agree = "" if w["measured"] == w["predicted"] else "   (differ)"
            memory = _condition(w)
            lines.append(f"  {w['model_id']:<22} x{w['workers']} @ {w['link_mbps']:g} Mbit/s"
                         f"{memory}: {w['measured']} / {w['predicted']}{agree}")
    return "\n".join(lines)


__all__ = ["MODES", "QUICK", "MdiDdiOptions", "format_report", "mdi_allocation",
           "run_mdi_ddi_bench"]
