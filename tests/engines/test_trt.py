"""The TensorRT backend without a GPU, and with one where ``tensorrt`` imports.

Most tests drive the real ``engines.trt`` code through ``FakeTrt`` and ``FakeCuda``: small
numpy stand-ins for the parts of the ``tensorrt`` and ``pycuda.driver`` APIs armdi uses, as
NVIDIA documents them. They check our control flow (API selection, buffers, batching, padding,
release), not TensorRT itself; the ``trt``-marked tests at the end do that on a real GPU.
"""

from __future__ import annotations

import asyncio
import functools
import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from engines.base import Engine
from engines.errors import ArtifactError, BackendUnavailableError, EngineError, InputSpecError
from engines.trt import (
    CudaWorker,
    DeviceSignature,
    TrtEngine,
    TrtSession,
    device_signature,
    import_pycuda,
    import_tensorrt,
    open_engine,
    parse_trt_version,
    plan_batches,
    select_api,
)

# --- fakes of the documented tensorrt / pycuda APIs -----------------------------------------

PLAN_MAGIC = b"FAKEPLAN"
CACHE_MAGIC = b"FAKECACHE"


class FakeAllocation:
    def __init__(self, cuda: FakeCuda, nbytes: int) -> None:
        self.cuda = cuda
        self.data = np.zeros(nbytes, np.uint8)
        self.address = cuda.next_address
        cuda.next_address += nbytes + 256
        cuda.memory[self.address] = self

    def __int__(self) -> int:
        return self.address

    def free(self) -> None:
        del self.cuda.memory[self.address]


class FakeStream:
    handle = 1234

    def synchronize(self) -> None:
        pass


class FakeContext:
    def __init__(self, cuda: FakeCuda) -> None:
        self.cuda = cuda

    def push(self) -> None:
        self.cuda.context_thread = threading.get_ident()

    def pop(self) -> None:
        self.cuda.context_thread = None

    def detach(self) -> None:
        self.cuda.detached = True


class FakeDevice:
    def __init__(self, cuda: FakeCuda, index: int) -> None:
        if index != 0:
            raise RuntimeError("cuDeviceGet failed: invalid device ordinal")
        self.cuda = cuda

    def name(self) -> str:
        return "Orin"

    def compute_capability(self) -> tuple[int, int]:
        return (8, 7)

    def retain_primary_context(self) -> FakeContext:
        return FakeContext(self.cuda)


class FakeCuda:
    """``pycuda.driver``: host memory is numpy, device memory is a dict of byte arrays."""

    def __init__(self) -> None:
        self.memory: dict[int, FakeAllocation] = {}
        self.next_address = 0x1000
        self.context_thread: int | None = None
        self.detached = False

    def init(self) -> None:
        pass

    def Device(self, index: int) -> FakeDevice:
        return FakeDevice(self, index)

    def Stream(self) -> FakeStream:
        return FakeStream()

    def pagelocked_empty(self, count: int, dtype: Any) -> np.ndarray:
        return np.empty(count, dtype)

    def mem_alloc(self, nbytes: int) -> FakeAllocation:
        self._on_context_thread()
        return FakeAllocation(self, nbytes)

    def memcpy_htod_async(self, dest: FakeAllocation, src: np.ndarray, stream: Any) -> None:
        self._on_context_thread()
        raw = np.ascontiguousarray(src).view(np.uint8).reshape(-1)
        dest.data[: raw.size] = raw

    def memcpy_dtoh_async(self, dest: np.ndarray, src: FakeAllocation, stream: Any) -> None:
        self._on_context_thread()
        dest.view(np.uint8).reshape(-1)[:] = src.data[: dest.nbytes]

    def _on_context_thread(self) -> None:
        assert self.context_thread == threading.get_ident(), "CUDA call off the CUDA thread"


def make_plan(
    input_name: str = "x",
    sample: tuple[int, ...] = (3, 4),
    min_batch: int = 1,
    max_batch: int = 4,
    scale: float = 2.0,
    dynamic: bool = True,
    stripped: bool = False,
) -> bytes:
    """A fake serialised engine computing ``y = scale * x + 1`` (same shape). A stripped one
    (``BuilderFlag.STRIP_PLAN``) computes NaN until it is refitted."""
    plan = {
        "input": input_name, "output": "y", "sample": list(sample), "min": min_batch,
        "max": max_batch, "scale": scale, "dynamic": dynamic, "stripped": stripped,
    }
    return PLAN_MAGIC + json.dumps(plan).encode()


class FakeIOMode:
    INPUT = "INPUT"
    OUTPUT = "OUTPUT"


class FakeEngine:
    def __init__(self, trt: FakeTrt, plan: dict[str, Any]) -> None:
        self.trt = trt
        self.plan = plan
        self.names: list[str] = [plan["input"], plan["output"]]
        batch = -1 if plan["dynamic"] else plan["max"]
        self.shape = (batch, *plan["sample"])
        self.refittable = bool(plan.get("stripped", False))  # only stripped plans are refit
        self.has_weights = not self.refittable
        trt.live_engines += 1

    def __del__(self) -> None:
        self.trt.live_engines -= 1

    # TensorRT 8 (bindings)
    @property
    def num_bindings(self) -> int:
        self.trt.used("bindings")
        return 2

    def get_binding_name(self, index: int) -> str:
        return self.names[index]

    def binding_is_input(self, index: int) -> bool:
        return index == 0

    def get_binding_shape(self, index: int) -> tuple[int, ...]:
        return self.shape

    def get_binding_dtype(self, index: int) -> str:
        return "float"

    def get_profile_shape(self, profile: int, index: int) -> list[tuple[int, ...]]:
        sample = tuple(self.plan["sample"])
        return [(self.plan["min"], *sample), (1, *sample), (self.plan["max"], *sample)]

    # TensorRT 10 (tensors)
    @property
    def num_io_tensors(self) -> int:
        self.trt.used("tensors")
        return 2

    def get_tensor_name(self, index: int) -> str:
        return self.names[index]

    def get_tensor_mode(self, name: str) -> str:
        return FakeIOMode.INPUT if name == self.plan["input"] else FakeIOMode.OUTPUT

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.shape

    def get_tensor_dtype(self, name: str) -> str:
        return "float"

    def get_tensor_profile_shape(self, name: str, profile: int) -> list[tuple[int, ...]]:
        return self.get_profile_shape(profile, 0)

    def create_execution_context(self) -> FakeExecutionContext:
        return FakeExecutionContext(self)


class FakeExecutionContext:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.shape: tuple[int, ...] | None = None
        self.addresses: dict[str, int] = {}
        engine.trt.live_contexts += 1

    def __del__(self) -> None:
        self.engine.trt.live_contexts -= 1

    def _set_shape(self, shape: tuple[int, ...]) -> bool:
        plan = self.engine.plan
        ok = bool(plan["min"] <= shape[0] <= plan["max"] and list(shape[1:]) == plan["sample"])
        if not plan["dynamic"]:
            ok = ok and shape[0] == plan["max"]
        self.shape = tuple(shape) if ok else None
        return ok

    def _execute(self, input_address: int, output_address: int) -> bool:
        cuda = self.engine.trt.cuda
        cuda._on_context_thread()
        assert self.shape is not None, "input shape not set"
        count = int(np.prod(self.shape))
        x = cuda.memory[input_address].data[: count * 4].view(np.float32)
        y = (x * self.engine.plan["scale"] + 1).astype(np.float32)
        if not self.engine.has_weights:  # a stripped plan run before its refit
            y[:] = np.nan
        cuda.memory[output_address].data[: count * 4] = y.view(np.uint8)
        self.engine.trt.executed_batches.append(self.shape[0])
        return True

    def set_binding_shape(self, index: int, shape: tuple[int, ...]) -> bool:
        assert index == 0
        return self._set_shape(shape)

    def execute_async_v2(self, bindings: list[int], stream_handle: int) -> bool:
        return self._execute(bindings[0], bindings[1])

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        assert name == self.engine.plan["input"]
        return self._set_shape(shape)

    def set_tensor_address(self, name: str, address: int) -> None:
        self.addresses[name] = address

    def execute_async_v3(self, stream_handle: int) -> bool:
        plan = self.engine.plan
        return self._execute(self.addresses[plan["input"]], self.addresses[plan["output"]])


class FakeLogger:
    WARNING = "WARNING"

    def __init__(self, level: str) -> None:
        self.level = level


class FakeRuntime:
    def __init__(self, trt: FakeTrt, logger: FakeLogger) -> None:
        self.trt = trt

    def deserialize_cuda_engine(self, data: bytes) -> FakeEngine | None:
        if not data.startswith(PLAN_MAGIC):
            return None  # what TensorRT does with an engine from another version
        return FakeEngine(self.trt, json.loads(data[len(PLAN_MAGIC) :]))


# builder side


class FakeEnum:
    def __init__(self, *names: str) -> None:
        for name in names:
            setattr(self, name, name)


class FakeCreationFlag:
    EXPLICIT_BATCH = 0  # TensorRT's value; armdi uses 1 << int(flag)


class FakeTensor:
    def __init__(self, name: str, shape: tuple[int, ...]) -> None:
        self.name = name
        self.shape = shape


class FakeNetwork:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.inputs: list[FakeTensor] = []

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, index: int) -> FakeTensor:
        return self.inputs[index]


class FakeParserError:
    def __init__(self, desc: str, node: int) -> None:
        self._desc, self._node = desc, node

    def desc(self) -> str:
        return self._desc

    def node(self) -> int:
        return self._node

    def code(self) -> str:
        return "ErrorCode.UNSUPPORTED_NODE"


class FakeOnnxParser:
    """Reads the ONNX file's input; rejects the op types in ``trt.parser_rejects``."""

    def __init__(self, trt: FakeTrt, network: FakeNetwork, logger: FakeLogger) -> None:
        self.trt = trt
        self.network = network
        self.errors: list[FakeParserError] = []

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, index: int) -> FakeParserError:
        return self.errors[index]

    def parse_from_file(self, path: str) -> bool:
        model = onnx.load(path, load_external_data=False)
        for index, node in enumerate(model.graph.node):
            if node.op_type in self.trt.parser_rejects:
                self.errors.append(FakeParserError(f"No importer registered for {node.op_type}",
                                                   index))
        for vi in model.graph.input:
            dims = tuple(d.dim_value if d.HasField("dim_value") else -1
                         for d in vi.type.tensor_type.shape.dim)
            self.network.inputs.append(FakeTensor(vi.name, dims))
        return not self.errors


class FakeTimingCache:
    def __init__(self, data: bytes) -> None:
        self.entries = int(data[len(CACHE_MAGIC):] or 0) if data.startswith(CACHE_MAGIC) else 0
        self.valid = data == b"" or data.startswith(CACHE_MAGIC)

    def serialize(self) -> bytes:
        return CACHE_MAGIC + str(self.entries).encode()


class FakeProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[tuple[int, ...], ...]] = {}

    def set_shape(self, name: str, low: Any, opt: Any, high: Any) -> None:
        self.shapes[name] = (tuple(low), tuple(opt), tuple(high))


class FakeConfig:
    def __init__(self) -> None:
        self.flags = {"TF32"}  # TensorRT enables TF32 by default
        self.pool_limits: dict[str, int] = {}
        self.default_device_type = "GPU"
        self.DLA_core = -1
        self.profiles: list[FakeProfile] = []
        self.cache: FakeTimingCache | None = None

    def set_flag(self, flag: str) -> None:
        self.flags.add(flag)

    def clear_flag(self, flag: str) -> None:
        self.flags.discard(flag)

    def set_memory_pool_limit(self, pool: str, size: int) -> None:
        self.pool_limits[pool] = size

    def add_optimization_profile(self, profile: FakeProfile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data: bytes) -> FakeTimingCache:
        return FakeTimingCache(bytes(data))

    def set_timing_cache(self, cache: FakeTimingCache, ignore_mismatch: bool) -> bool:
        if not cache.valid:
            return False
        self.cache = cache
        return True

    def get_timing_cache(self) -> FakeTimingCache:
        assert self.cache is not None
        return self.cache


class FakeBuilder:
    def __init__(self, trt: FakeTrt, logger: FakeLogger) -> None:
        self.trt = trt
        self.num_DLA_cores = trt.dla_cores
        self.platform_has_fast_fp16 = True

    def create_network(self, flags: int) -> FakeNetwork:
        network = FakeNetwork(flags)
        self.trt.networks.append(network)
        return network

    def create_builder_config(self) -> FakeConfig:
        return FakeConfig()

    def create_optimization_profile(self) -> FakeProfile:
        return FakeProfile()

    def build_serialized_network(self, network: FakeNetwork, config: FakeConfig) -> bytes:
        self.trt.cuda._on_context_thread()
        self.trt.builds.append(config)
        assert config.cache is not None, "build without a timing cache"
        config.cache.entries += 1
        tensor = network.inputs[0]
        low, _, high = config.profiles[0].shapes[tensor.name]
        return make_plan(tensor.name, tuple(tensor.shape[1:]), low[0], high[0], dynamic=True,
                         stripped="STRIP_PLAN" in config.flags)


class FakeRefitter:
    """``tensorrt.Refitter``: ``refit_cuda_engine`` succeeds once weights were supplied."""

    def __init__(self, engine: FakeEngine, logger: FakeLogger) -> None:
        self.engine = engine
        self.supplied_from: str | None = None

    def get_missing_weights(self) -> list[str]:
        return [] if self.supplied_from else ["w", "b", "fc_w", "fc_b"]

    def refit_cuda_engine(self) -> bool:
        self.engine.trt.cuda._on_context_thread()
        if self.supplied_from is None:
            return False
        self.engine.has_weights = True
        return True


class FakeOnnxParserRefitter:
    """``tensorrt.OnnxParserRefitter``: reads the ONNX file's weights, external data included
    (a missing weights file fails as the real parser does)."""

    def __init__(self, refitter: FakeRefitter, logger: FakeLogger) -> None:
        self.refitter = refitter
        self.errors: list[FakeParserError] = []

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, index: int) -> FakeParserError:
        return self.errors[index]

    def refit_from_file(self, path: str) -> bool:
        try:
            onnx.load(path)  # loads external data: fails when weights.bin is missing
        except Exception as exc:
            self.errors.append(FakeParserError(f"failed to load weights: {exc}", -1))
            return False
        self.refitter.supplied_from = path
        self.refitter.engine.trt.refits.append(path)
        return True


class FakeTrt:
    """The ``tensorrt`` module, as far as armdi uses it."""

    def __init__(self, version: str = "10.3.0", cuda: FakeCuda | None = None) -> None:
        self.__version__ = version
        self.cuda = cuda or FakeCuda()
        self.Logger = FakeLogger
        self.TensorIOMode = FakeIOMode
        self.NetworkDefinitionCreationFlag = FakeCreationFlag
        self.MemoryPoolType = FakeEnum("WORKSPACE")
        strip_flags = ("STRIP_PLAN", "REFIT_IDENTICAL") if version.startswith("10") else ()
        self.BuilderFlag = FakeEnum("TF32", "FP16", "GPU_FALLBACK", *strip_flags)
        self.DeviceType = FakeEnum("GPU", "DLA")
        self.live_engines = 0
        self.live_contexts = 0
        self.executed_batches: list[int] = []
        self.apis_used: set[str] = set()
        self.dla_cores = 0
        self.parser_rejects: set[str] = set()
        self.builds: list[FakeConfig] = []
        self.networks: list[FakeNetwork] = []
        self.refits: list[str] = []
        if version.startswith("10"):  # TensorRT 10's refit API
            self.Refitter = FakeRefitter
            self.OnnxParserRefitter = FakeOnnxParserRefitter

    def used(self, api: str) -> None:
        self.apis_used.add(api)

    def Runtime(self, logger: FakeLogger) -> FakeRuntime:
        return FakeRuntime(self, logger)

    def Builder(self, logger: FakeLogger) -> FakeBuilder:
        return FakeBuilder(self, logger)

    def OnnxParser(self, network: FakeNetwork, logger: FakeLogger) -> FakeOnnxParser:
        return FakeOnnxParser(self, network, logger)

    @staticmethod
    def nptype(dtype: str) -> type:
        return {"float": np.float32, "half": np.float16}[dtype]


def fake_session(version: str = "10.3.0") -> tuple[TrtSession, FakeTrt]:
    """A ``TrtSession`` over the fakes, with a real ``CudaWorker`` thread."""
    from engines.trt import _primary_context_setup

    trt = FakeTrt(version)
    worker = CudaWorker(setup=lambda: _primary_context_setup(trt.cuda, 0))
    device = DeviceSignature("Orin", (8, 7), version)
    return TrtSession(trt, trt.cuda, worker, device), trt


# --- versions and API selection -----------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "api"),
    [("8.5.2", "bindings"), ("8.5.2.2", "bindings"), ("8.6.1", "bindings"),
     ("8.6.1.post1", "bindings"), ("8.6.2.3", "bindings"), ("10.3.0", "tensors"),
     ("10.3.0.26", "tensors"), ("10.0", "tensors")],
)
def test_select_api(version: str, api: str) -> None:
    assert select_api(version) == api


@pytest.mark.parametrize("junk", ["", "junk", "ten.three", "10", "v10.3.0", "10.3.0 beta", "8.x"])
def test_select_api_rejects_junk(junk: str) -> None:
    with pytest.raises(ValueError, match="not a TensorRT version"):
        select_api(junk)


@pytest.mark.parametrize("old", ["7.1.3", "8.4.1", "8.2.5.1", "9.2.0", "11.0.0"])
def test_select_api_rejects_versions_we_do_not_drive(old: str) -> None:
    with pytest.raises(BackendUnavailableError, match=r"8\.5, 8\.6 and 10\.x.*--backend ort"):
        select_api(old)


def test_parse_trt_version() -> None:
    assert parse_trt_version("8.5.2.2") == (8, 5, 2)
    assert parse_trt_version(" 10.3 ") == (10, 3, 0)


def test_device_signature_slug_is_file_name_safe() -> None:
    sig = DeviceSignature("NVIDIA Jetson AGX Orin (64GB)", (8, 7), "8.5.2.2")
    assert sig.slug == "nvidia-jetson-agx-orin-64gb-sm87-trt8.5.2.2"


# --- clear errors where TensorRT / pycuda are absent ----------------------------------------


@pytest.fixture
def no_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail


def test_missing_tensorrt_says_what_to_do(no_tensorrt: None) -> None:
    with pytest.raises(BackendUnavailableError) as info:
        import_tensorrt()
    message = str(info.value)
    assert message.startswith("TensorRT is not available on this machine: ")
    assert "python3-libnvinfer" in message and "jetson_setup.sh" in message
    assert message.endswith("or use --backend ort")
    assert isinstance(info.value.__cause__, ImportError)


def test_device_signature_and_session_need_tensorrt(no_tensorrt: None) -> None:
    with pytest.raises(BackendUnavailableError, match="not available on this machine"):
        device_signature()
    with pytest.raises(BackendUnavailableError, match="not available on this machine"):
        TrtSession.start()


def test_missing_pycuda_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pycuda", None)
    monkeypatch.setitem(sys.modules, "pycuda.driver", None)
    with pytest.raises(BackendUnavailableError, match=r"pycuda.*--backend ort"):
        import_pycuda()


def test_modules_import_lazily_without_tensorrt() -> None:
    code = (
        "import sys; sys.modules['tensorrt'] = None; sys.modules['pycuda'] = None\n"
        "import engines.trt, builder.trt_build\n"
        "assert engines.trt.TrtEngine.backend == 'trt'\n"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# --- batch planning ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "low", "high", "runs"),
    [
        (1, 1, 8, [(0, 1, 1)]),
        (8, 1, 8, [(0, 8, 8)]),
        (10, 1, 4, [(0, 4, 4), (4, 4, 4), (8, 2, 2)]),
        (3, 4, 4, [(0, 3, 4)]),  # DLA: static batch 4, padded
        (9, 4, 4, [(0, 4, 4), (4, 4, 4), (8, 1, 4)]),
    ],
)
def test_plan_batches(count: int, low: int, high: int, runs: list[tuple[int, int, int]]) -> None:
    assert plan_batches(count, low, high) == runs


@pytest.mark.parametrize(("count", "low", "high"), [(0, 1, 4), (1, 0, 4), (1, 5, 4)])
def test_plan_batches_rejects_nonsense(count: int, low: int, high: int) -> None:
    with pytest.raises(ValueError):
        plan_batches(count, low, high)


# --- the CUDA worker thread ---------------------------------------------------------------


def test_worker_runs_every_job_on_one_thread_in_order() -> None:
    seen: list[tuple[int, int]] = []

    def record(index: int) -> None:
        seen.append((index, threading.get_ident()))

    worker = CudaWorker()
    try:
        futures = [worker.submit(functools.partial(record, i)) for i in range(20)]
        for future in futures:
            future.result(5)
    finally:
        worker.close()
    assert [i for i, _ in seen] == list(range(20))
    threads = {t for _, t in seen}
    assert len(threads) == 1 and threading.get_ident() not in threads


def test_worker_setup_and_teardown_run_on_the_worker_thread() -> None:
    events: list[tuple[str, int]] = []

    def setup() -> Any:
        events.append(("setup", threading.get_ident()))
        return lambda: events.append(("teardown", threading.get_ident()))

    worker = CudaWorker(setup=setup)
    job_thread = worker.call(threading.get_ident)
    worker.close()
    assert events == [("setup", job_thread), ("teardown", job_thread)]


def test_worker_propagates_exceptions_and_keeps_running() -> None:
    worker = CudaWorker()
    try:
        with pytest.raises(ZeroDivisionError):
            worker.call(lambda: 1 // 0)
        assert worker.call(lambda: 42) == 42
    finally:
        worker.close()


def test_worker_setup_failure_raises_from_the_constructor() -> None:
    def setup() -> Any:
        raise RuntimeError("cuCtxCreate failed")

    with pytest.raises(RuntimeError, match="cuCtxCreate"):
        CudaWorker(setup=setup)


def test_worker_nested_call_runs_inline_instead_of_deadlocking() -> None:
    worker = CudaWorker()
    try:
        assert worker.call(lambda: worker.call(lambda: "inner"), timeout=5) == "inner"
    finally:
        worker.close()


def test_worker_closed_refuses_jobs_and_closes_twice() -> None:
    worker = CudaWorker()
    worker.close()
    worker.close()
    assert worker.closed
    with pytest.raises(EngineError, match="closed"):
        worker.submit(lambda: None)


def test_worker_close_finishes_queued_jobs() -> None:
    worker = CudaWorker()
    gate = threading.Event()
    first = worker.submit(gate.wait)
    second = worker.submit(lambda: "done")
    gate.set()
    worker.close()
    assert first.result(1) is True and second.result(1) == "done"


def test_worker_futures_are_awaitable() -> None:
    worker = CudaWorker()

    async def main() -> int:
        return await asyncio.wrap_future(worker.submit(lambda: 7))

    try:
        assert asyncio.run(main()) == 7
    finally:
        worker.close()


# --- TrtEngine over the fakes -----------------------------------------------------------


@pytest.mark.parametrize(("version", "api"), [("8.5.2", "bindings"), ("10.3.0", "tensors")])
def test_engine_runs_with_either_api(tmp_path: Path, version: str, api: str) -> None:
    session, trt = fake_session(version)
    path = tmp_path / "seg.engine"
    path.write_bytes(make_plan(max_batch=4))
    try:
        engine = TrtEngine.load(path, start=2, end=5, session=session)
        assert isinstance(engine, Engine)
        assert trt.apis_used == {api}
        assert engine.input_spec.shape == (-1, 3, 4) and engine.output_spec.name == "y"
        assert engine.max_batch == 4
        assert trt.executed_batches == [1, 4]  # warm-up at the smallest and largest batch
        x = np.random.default_rng(0).standard_normal((10, 3, 4)).astype(np.float32)
        y = engine.infer(x)
        np.testing.assert_allclose(y, 2 * x + 1, rtol=1e-6)
        assert trt.executed_batches[2:] == [4, 4, 2]  # 10 samples in runs of at most 4
        engine.close()
        engine.close()
    finally:
        session.close()


def test_open_engine_is_load_with_the_session(tmp_path: Path) -> None:
    session, _ = fake_session("8.6.1")
    path = tmp_path / "seg.engine"
    path.write_bytes(make_plan())
    try:
        engine = open_engine(path, 3, 4, session=session)
        assert (engine.backend, engine.start, engine.end) == ("trt", 3, 4)
        assert engine.label == "trt[3,4)"
    finally:
        session.close()


def test_engine_pads_to_a_static_batch(tmp_path: Path) -> None:
    session, trt = fake_session()
    path = tmp_path / "dla.engine"
    path.write_bytes(make_plan(min_batch=4, max_batch=4, dynamic=False))
    try:
        engine = TrtEngine.load(path, start=0, end=1, session=session, warmup=False)
        x = np.ones((3, 3, 4), np.float32)
        np.testing.assert_allclose(engine.infer(x), np.full((3, 3, 4), 3.0))
        assert trt.executed_batches == [4]
    finally:
        session.close()


def test_engine_validates_inputs_before_touching_the_gpu(tmp_path: Path) -> None:
    session, trt = fake_session()
    path = tmp_path / "seg.engine"
    path.write_bytes(make_plan())
    try:
        engine = TrtEngine.load(path, start=0, end=1, session=session, warmup=False)
        with pytest.raises(InputSpecError):
            engine.infer(np.zeros((1, 4, 3), np.float32))
        with pytest.raises(InputSpecError):
            engine.infer(np.zeros((1, 3, 4), np.float64))
        assert trt.executed_batches == []
    finally:
        session.close()


def test_close_releases_gpu_memory_and_engine(tmp_path: Path) -> None:
    session, trt = fake_session()
    path = tmp_path / "seg.engine"
    path.write_bytes(make_plan())
    try:
        old = TrtEngine.load(path, start=0, end=2, session=session)
        new = TrtEngine.load(path, start=0, end=2, session=session)
        assert len(trt.cuda.memory) == 4
        old.close()  # swapped out for `new`
        assert len(trt.cuda.memory) == 2
        with pytest.raises(EngineError, match="closed"):
            old.infer(np.zeros((1, 3, 4), np.float32))
        assert new.infer(np.zeros((1, 3, 4), np.float32)).shape == (1, 3, 4)
    finally:
        session.close()
    assert trt.cuda.memory == {}  # session.close() released `new` too
    assert trt.live_contexts == 0 and trt.live_engines == 0
    assert trt.cuda.context_thread is None and trt.cuda.detached
    new.close()  # after the session: a no-op, not a crash


def test_engine_from_another_tensorrt_is_a_clear_error(tmp_path: Path) -> None:
    session, _ = fake_session()
    path = tmp_path / "old.engine"
    path.write_bytes(b"an engine built by TensorRT 8.5")
    try:
        with pytest.raises(EngineError, match=r"does not deserialise.*armdi build --backend trt"):
            TrtEngine.load(path, start=0, end=1, session=session)
        with pytest.raises(ArtifactError, match="cannot read"):
            TrtEngine.load(tmp_path / "missing.engine", start=0, end=1, session=session)
    finally:
        session.close()


def test_tensorrt_exceptions_become_engine_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    session, _ = fake_session()
    path = tmp_path / "seg.engine"
    path.write_bytes(make_plan())

    def boom(self: FakeExecutionContext, stream_handle: int) -> bool:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    try:
        engine = TrtEngine.load(path, start=0, end=1, session=session, warmup=False)
        monkeypatch.setattr(FakeExecutionContext, "execute_async_v3", boom)
        with pytest.raises(EngineError, match="illegal memory access") as info:
            engine.infer(np.zeros((1, 3, 4), np.float32))
        assert isinstance(info.value.__cause__, RuntimeError)
    finally:
        session.close()


# --- on a real GPU ------------------------------------------------------------------------


def tiny_model(path: Path, opset: int = 17) -> None:
    """A dynamic-batch Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm, 10 classes."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b"),
        numpy_helper.from_array(rng.standard_normal((10, 8)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "fc_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def gpu_session() -> Any:
    pytest.importorskip("tensorrt", reason="TensorRT is not available on this machine")
    pytest.importorskip("pycuda.driver", reason="pycuda is not available on this machine")
    session = TrtSession.start()
    yield session
    session.close()


@pytest.mark.trt
def test_gpu_swap_releases_the_old_engine(gpu_session: TrtSession, tmp_path: Path) -> None:
    from builder.trt_build import TrtBuilder, TrtBuildOptions

    onnx_path = tmp_path / "tiny.onnx"
    tiny_model(onnx_path)
    builder = TrtBuilder(gpu_session, TrtBuildOptions(max_batch=4), tmp_path)
    built = builder.build_segment(onnx_path, fingerprint="f" * 64, start=0, end=1)
    cuda = gpu_session.cuda
    engines = [TrtEngine.load(built.path, start=0, end=1, session=gpu_session) for _ in range(2)]
    free_before = gpu_session.run(lambda: cuda.mem_get_info()[0], "mem_get_info")
    engines[0].close()
    free_after = gpu_session.run(lambda: cuda.mem_get_info()[0], "mem_get_info")
    assert free_after >= free_before
    x = np.zeros((2, 3, 16, 16), np.float32)
    assert engines[1].infer(x).shape == (2, 10)
    engines[1].close()
