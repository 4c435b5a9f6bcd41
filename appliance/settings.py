"""From a validated ``cluster.toml`` to the frozen settings of one process."""

from __future__ import annotations

from appliance.config import ClusterConfig
from appliance.control.controller import ControllerSettings
from appliance.control.detector import DetectorSettings
from appliance.data.node import NodeSettings
from appliance.data.source import SourceSettings, WorkerRef


def resolve_backend(backend: str) -> str:
    """``auto`` is TensorRT where it imports, else ONNX Runtime."""
    if backend != "auto":
        return backend
    from engines.trt import tensorrt_major

    return "trt" if tensorrt_major() is not None else "ort"


def node_settings(config: ClusterConfig, name: str,
                  parent_pid: int | None = None) -> NodeSettings:
    worker = config.worker(name)
    c = config.cluster
    return NodeSettings(
        name=worker.name, data_addr=worker.data_addr, control_addr=worker.control_addr,
        repo=c.repo, model_id=c.model, backend=resolve_backend(c.backend),
        threads=worker.threads, slowdown=worker.slowdown, cpus=worker.cpus,
        key=c.hmac_key(), max_frame_bytes=c.max_frame_bytes, queue_depth=c.queue_depth,
        parent_pid=parent_pid, tls=config.tls_files(worker.name),
        emulate=c.emulate_compute, emulate_scale=c.emulate_scale,
        emulate_times=c.emulate_times,
        heartbeat_ms=c.heartbeat_ms, stabilise_ms=c.stabilise_ms,
        link_Bps=_emulated_link(c.emulate_links, worker.bandwidth_Bps),
        controller=ControllerSettings(hysteresis=c.hysteresis),
        link_delay_s=c.link_delay_ms / 1000,
    )


def source_settings(config: ClusterConfig) -> SourceSettings:
    c, s = config.cluster, config.source
    workers = tuple(
        WorkerRef(name=w.name, data_addr=w.data_addr, control_addr=w.control_addr,
                  slowdown=w.slowdown, bandwidth_Bps=w.bandwidth_Bps, latency_ms=w.latency_ms,
                  max_blocks=w.max_blocks)
        for w in config.workers
    )
    return SourceSettings(
        name=s.name, data_addr=s.data_addr, repo=c.repo, model_id=c.model, workers=workers,
        mode=c.mode, ddi_input=c.ddi_input,
        chain_workers=c.chain_workers, backend=resolve_backend(c.backend), threads=s.threads,
        slowdown=s.slowdown, bandwidth_Bps=s.bandwidth_Bps, latency_ms=s.latency_ms,
        cpus=s.cpus, run_blocks=s.run_blocks, max_blocks=s.max_blocks, key=c.hmac_key(),
        wire_dtype=c.wire_dtype, min_workers=c.min_workers, control_addr=s.control_addr,
        successors=c.successors,
        detector=DetectorSettings(interval_ms=c.heartbeat_ms, phi_threshold=c.phi_threshold,
                                  acceptable_pause_ms=c.acceptable_pause_ms,
                                  max_silence_ms=c.max_silence_ms),
        max_frame_bytes=c.max_frame_bytes, request_timeout_s=c.request_timeout_s,
        max_in_flight=max(4, c.queue_depth * (len(workers) + 1) * 2),
        tls=config.tls_files(s.name),
        link_Bps=_emulated_link(c.emulate_links, s.bandwidth_Bps),
        link_delay_s=c.link_delay_ms / 1000,
    )


def _emulated_link(emulate: bool, bandwidth_Bps: float) -> float | None:
    """The rate a node's transport enforces on its sends (None: as fast as the link goes)."""
    if not emulate or bandwidth_Bps == float("inf"):
        return None
    return bandwidth_Bps
