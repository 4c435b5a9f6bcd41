"""The TensorRT backend: one CUDA thread per process runs every TensorRT engine.

Threading model. CUDA contexts are per thread, and TensorRT execution contexts, streams and
pinned buffers must be used with the context that made them. So one ``CudaWorker`` thread
makes the CUDA context current once and runs *every* TensorRT call of the process —
deserialising, building, inferring, freeing. Other threads hand it callables through a queue
and wait on a future (``asyncio.wrap_future`` turns that into an awaitable for the event loop).

The owner of that thread is an explicit ``TrtSession`` object, created once by the
composition root (the CLI or node start-up) and passed to every ``TrtEngine.load`` and to the
builder. We chose the explicit owner over a lazily created module-level singleton: there is
no hidden global state, its lifetime is visible (``session.close()`` frees every engine
still open, then the context), and tests can make and drop their own.

The worker retains the device's *primary* context (the one the CUDA runtime, hence TensorRT,
uses) rather than creating a second one with ``make_context``: on a Jetson every context costs
memory shared with the CPU.

API versions. TensorRT 8.5/8.6 (JetPack 5.1 / 6.0) are driven through the binding-index API
(``num_bindings``, ``set_binding_shape``, ``execute_async_v2``); TensorRT 10.x (JetPack 6.1+)
removed it, and is driven through tensor names (``num_io_tensors``, ``set_input_shape``,
``set_tensor_address``, ``execute_async_v3``). ``select_api`` picks one from the version.

``tensorrt`` and ``pycuda`` are imported lazily, so this module imports on any machine; where
they are absent every entry point raises ``BackendUnavailableError`` saying what to do.

This module was written against NVIDIA's documented Python API and has not been run on a GPU
by its author; see ``docs/tensorrt.md``.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np

from engines.base import BaseEngine, TensorSpec
from engines.errors import ArmdiError, ArtifactError, BackendUnavailableError, EngineError

log = logging.getLogger(__name__)

T = TypeVar("T")
TrtApi = Literal["bindings", "tensors"]

SUPPORTED_VERSIONS = "8.5, 8.6 and 10.x"
_VERSION_RE = re.compile(r"^(\d+)\.(\d+)(?:\.(\d+))?(?:\.[0-9A-Za-z]+)*$")
REBUILD_HINT = "rebuild it on this device with `armdi build --backend trt`"


# --- availability and versions -------------------------------------------------------------


def unavailable_message(reason: str) -> str:
    return (
        f"TensorRT is not available on this machine: {reason}. Install JetPack's "
        "python3-libnvinfer (see jetson_setup.sh) or use --backend ort"
    )


def import_tensorrt() -> Any:
    """Import ``tensorrt`` or raise ``BackendUnavailableError`` saying what to do."""
    try:
        import tensorrt
    except Exception as exc:  # ImportError, or OSError when libnvinfer.so is missing
        reason = f"`import tensorrt` failed ({exc})"
        raise BackendUnavailableError(unavailable_message(reason)) from exc
    return tensorrt


def tensorrt_major() -> int | None:
    """TensorRT's major version where it imports, else None (the one availability check)."""
    try:
        return parse_trt_version(str(import_tensorrt().__version__))[0]
    except (BackendUnavailableError, ValueError):
        return None


def import_pycuda() -> Any:
    """Import ``pycuda.driver`` (no autoinit) or raise ``BackendUnavailableError``."""
    try:
        import pycuda.driver as cuda
    except Exception as exc:
        reason = f"`import pycuda.driver` failed ({exc}); armdi drives TensorRT through pycuda"
        raise BackendUnavailableError(unavailable_message(reason)) from exc
    return cuda


def parse_trt_version(version: str) -> tuple[int, int, int]:
    """``"8.5.2.2"`` -> ``(8, 5, 2)``; ``ValueError`` for anything that is not a version."""
    match = _VERSION_RE.match(version.strip())
    if match is None:
        raise ValueError(f"not a TensorRT version: {version!r}")
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


def require_supported(version: str) -> tuple[int, int, int]:
    """The parsed version, or ``BackendUnavailableError`` if armdi does not drive it."""
    parsed = parse_trt_version(version)
    major, minor, _ = parsed
    if (major == 8 and minor >= 5) or major == 10:
        return parsed
    raise BackendUnavailableError(
        f"TensorRT {version} is not a version armdi supports ({SUPPORTED_VERSIONS}); "
        "install one of those (JetPack 5.1 ships 8.5, JetPack 6.0 8.6, JetPack 6.1+ 10.x) "
        "or use --backend ort"
    )


def select_api(trt_version: str) -> TrtApi:
    """Which execution API to drive: ``"bindings"`` for 8.5/8.6, ``"tensors"`` for 10.x."""
    major, _, _ = require_supported(trt_version)
    return "bindings" if major == 8 else "tensors"


@dataclass(frozen=True)
class DeviceSignature:
    """What a TensorRT engine is tied to: the GPU model and the TensorRT version."""

    gpu_name: str
    compute_capability: tuple[int, int]
    trt_version: str

    @property
    def slug(self) -> str:
        """A file-name-safe summary, e.g. ``orin-sm87-trt8.5.2``."""
        name = re.sub(r"[^a-z0-9]+", "-", self.gpu_name.lower()).strip("-") or "gpu"
        major, minor = self.compute_capability
        version = re.sub(r"[^0-9A-Za-z.]+", "-", self.trt_version)
        return f"{name}-sm{major}{minor}-trt{version}"


def device_signature(device_index: int = 0) -> DeviceSignature:
    """GPU name, compute capability and TensorRT version of this machine.

    Raises ``BackendUnavailableError`` where TensorRT, pycuda or a CUDA device is absent.
    """
    trt = import_tensorrt()
    require_supported(str(trt.__version__))
    cuda = import_pycuda()
    try:
        cuda.init()
        device = cuda.Device(device_index)
        name = str(device.name())
        major, minor = device.compute_capability()
    except Exception as exc:
        raise BackendUnavailableError(
            unavailable_message(f"no usable CUDA device {device_index} ({exc})")
        ) from exc
    return DeviceSignature(name, (int(major), int(minor)), str(trt.__version__))


def plan_batches(count: int, min_batch: int, max_batch: int) -> list[tuple[int, int, int]]:
    """Split ``count`` samples into runs the engine's profile accepts.

    Returns ``(offset, samples, run_batch)`` per run: chunks of at most ``max_batch``, each run
    padded up to ``min_batch`` (a DLA engine has ``min_batch == max_batch``).
    """
    if count < 1 or not 1 <= min_batch <= max_batch:
        raise ValueError(f"bad batch plan: count={count}, min={min_batch}, max={max_batch}")
    runs = []
    for offset in range(0, count, max_batch):
        samples = min(max_batch, count - offset)
        runs.append((offset, samples, max(samples, min_batch)))
    return runs


# --- the CUDA thread -----------------------------------------------------------------------


class CudaWorker:
    """One thread with a queue of callables; ``setup`` runs first on that thread.

    ``setup`` (for CUDA: make the context current) returns an optional teardown that runs on
    the same thread when the worker closes. Jobs run one at a time, in submission order.
    """

    def __init__(
        self,
        name: str = "armdi-cuda",
        setup: Callable[[], Callable[[], None] | None] | None = None,
    ) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]] | None]
        self._jobs = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        ready: Future[None] = Future()
        self._thread = threading.Thread(
            target=self._run, args=(setup, ready), name=name, daemon=True
        )
        self._thread.start()
        try:
            ready.result()
        except BaseException:
            self._closed = True
            self._thread.join()
            raise

    @property
    def on_worker_thread(self) -> bool:
        return threading.get_ident() == self._thread.ident

    @property
    def closed(self) -> bool:
        return self._closed

    def _run(
        self, setup: Callable[[], Callable[[], None] | None] | None, ready: Future[None]
    ) -> None:
        try:
            teardown = setup() if setup is not None else None
        except BaseException as exc:
            ready.set_exception(exc)
            return
        ready.set_result(None)
        while True:
            job = self._jobs.get()
            if job is None:
                break
            fn, future = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)
        if teardown is not None:
            try:
                teardown()
            except Exception:
                log.exception("CUDA worker teardown failed")

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        """Queue ``fn`` for the worker thread; the future carries its result or exception."""
        future: Future[T] = Future()
        with self._lock:
            if self._closed:
                raise EngineError("the CUDA worker thread is closed")
            self._jobs.put((fn, future))
        return future

    def call(self, fn: Callable[[], T], timeout: float | None = None) -> T:
        """Run ``fn`` on the worker thread and wait; runs inline when already on it."""
        if self.on_worker_thread:
            return fn()
        return self.submit(fn).result(timeout)

    def close(self, timeout: float | None = None) -> None:
        """Finish queued jobs, run the teardown and stop the thread. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._jobs.put(None)
        if not self.on_worker_thread:
            self._thread.join(timeout)


def _primary_context_setup(cuda: Any, device_index: int) -> Callable[[], None]:
    """Make ``device_index``'s primary context current on the calling thread."""
    cuda.init()
    context = cuda.Device(device_index).retain_primary_context()
    context.push()

    def teardown() -> None:
        context.pop()
        context.detach()

    return teardown


# --- the session: the process's owner of the worker, logger and runtime --------------------


@dataclass(frozen=True)
class EngineIO:
    """The one input and one output of a deserialised segment engine, and its batch range."""

    input: TensorSpec
    output: TensorSpec
    input_index: int  # binding index (bindings API); the tensors API uses the names
    output_index: int
    min_batch: int
    max_batch: int


class TrtSession:
    """Owns the CUDA worker thread, the TensorRT logger and runtime; one per process.

    Create it with ``TrtSession.start()`` in the composition root, pass it down, and
    ``close()`` it at shutdown (engines still open are released first).
    """

    def __init__(self, trt: Any, cuda: Any, worker: CudaWorker, device: DeviceSignature) -> None:
        self.trt = trt
        self.cuda = cuda
        self.worker = worker
        self.device = device
        self.api: TrtApi = select_api(device.trt_version)
        self.logger, self.runtime = self.run(
            lambda: self._make_runtime(trt), "creating the TensorRT runtime"
        )
        self._open: set[_TrtState] = set()

    @staticmethod
    def _make_runtime(trt: Any) -> tuple[Any, Any]:
        logger = trt.Logger(trt.Logger.WARNING)
        return logger, trt.Runtime(logger)

    @classmethod
    def start(cls, device_index: int = 0) -> TrtSession:
        """Check TensorRT, pycuda and the GPU, then start the CUDA thread."""
        device = device_signature(device_index)
        trt = import_tensorrt()
        cuda = import_pycuda()
        try:
            worker = CudaWorker(setup=lambda: _primary_context_setup(cuda, device_index))
        except Exception as exc:
            reason = f"could not make a CUDA context on device {device_index} ({exc})"
            raise BackendUnavailableError(unavailable_message(reason)) from exc
        try:
            return cls(trt, cuda, worker, device)
        except BaseException:
            worker.close()
            raise

    def run(self, fn: Callable[[], T], what: str) -> T:
        """Run ``fn`` on the CUDA thread; TensorRT/CUDA exceptions become ``EngineError``."""

        def mapped() -> T:
            try:
                return fn()
            except ArmdiError:
                raise
            except Exception as exc:
                raise EngineError(f"TensorRT/CUDA error while {what}: {exc}") from exc

        return self.worker.call(mapped)

    def deserialize(self, data: bytes, what: str) -> Any:
        """An ``ICudaEngine`` from serialised bytes; call on the CUDA thread."""
        try:
            engine = self.runtime.deserialize_cuda_engine(data)
        except Exception as exc:
            raise EngineError(f"{what} does not deserialise ({exc}); {REBUILD_HINT}") from exc
        if engine is None:
            raise EngineError(
                f"{what} does not deserialise with TensorRT {self.device.trt_version} on "
                f"{self.device.gpu_name} (built by another TensorRT version or GPU?); "
                f"{REBUILD_HINT}"
            )
        return engine

    def refit(self, engine: Any, onnx_path: Path | None, label: str) -> None:
        """Fill a weight-stripped engine's weights from ``onnx_path`` (TensorRT 10); call on
        the CUDA thread. An engine that is not refittable (a full plan) is left as it is.

        The segment's ONNX file points into the model's shared ``weights.bin`` (external
        data), which the ONNX parser's refitter reads by path.
        """
        if not bool(getattr(engine, "refittable", False)):
            return
        if onnx_path is None:
            raise EngineError(f"{label} is a weight-stripped plan and needs its segment's ONNX "
                              f"file to refit from; {REBUILD_HINT}")
        trt = self.trt
        refitter = trt.Refitter(engine, self.logger)
        parser_refitter = trt.OnnxParserRefitter(refitter, self.logger)
        if not parser_refitter.refit_from_file(str(onnx_path)):
            errors = [str(parser_refitter.get_error(i).desc())
                      for i in range(int(getattr(parser_refitter, "num_errors", 0)))]
            raise EngineError(f"{label}: cannot refit the weights from {onnx_path}: "
                              f"{'; '.join(errors) or 'the ONNX refitter gave no reason'}")
        if not refitter.refit_cuda_engine():
            missing = refitter.get_missing_weights() if hasattr(
                refitter, "get_missing_weights") else []
            raise EngineError(f"{label}: refitting from {onnx_path} left weights missing "
                              f"({', '.join(map(str, missing[:5])) or 'unknown'}); "
                              f"{REBUILD_HINT}")

    def probe(self, data: bytes) -> EngineIO:
        """Deserialise ``data`` and describe its input/output (the builder's load check)."""

        def job() -> EngineIO:
            engine = self.deserialize(data, "the engine")
            try:
                return _engine_io(self.trt, engine, self.api, "the engine")
            finally:
                del engine

        return self.run(job, "inspecting an engine")

    def _register(self, state: _TrtState) -> None:
        self._open.add(state)

    def _forget(self, state: _TrtState) -> None:
        self._open.discard(state)

    def close(self) -> None:
        """Release every engine still open, then the CUDA context and thread."""
        if self.worker.closed:
            return
        for state in list(self._open):
            try:
                self.worker.call(state.release)
            except Exception:
                log.exception("releasing a TensorRT engine at shutdown failed")
        self._open.clear()

        def drop_runtime() -> None:
            self.runtime = None
            self.logger = None

        self.worker.call(drop_runtime)
        self.worker.close()


def _engine_io(trt: Any, engine: Any, api: TrtApi, label: str) -> EngineIO:
    """Find the single input and output of ``engine`` with the API of this TensorRT."""
    inputs: list[tuple[int, str, tuple[int, ...], np.dtype[Any]]] = []
    outputs: list[tuple[int, str, tuple[int, ...], np.dtype[Any]]] = []
    if api == "bindings":
        for index in range(engine.num_bindings):
            name = str(engine.get_binding_name(index))
            shape = tuple(int(d) for d in engine.get_binding_shape(index))
            dtype = np.dtype(trt.nptype(engine.get_binding_dtype(index)))
            (inputs if engine.binding_is_input(index) else outputs).append(
                (index, name, shape, dtype)
            )
    else:
        for index in range(engine.num_io_tensors):
            name = str(engine.get_tensor_name(index))
            shape = tuple(int(d) for d in engine.get_tensor_shape(name))
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (inputs if is_input else outputs).append((index, name, shape, dtype))
    if len(inputs) != 1 or len(outputs) != 1:
        raise EngineError(
            f"{label}: a segment engine has one input and one output, this one has "
            f"{len(inputs)} and {len(outputs)}"
        )
    (in_index, in_name, in_shape, in_dtype), (out_index, out_name, out_shape, out_dtype) = (
        inputs[0],
        outputs[0],
    )
    for name, shape in ((in_name, in_shape), (out_name, out_shape)):
        if len(shape) < 1 or any(d < 1 for d in shape[1:]):
            raise EngineError(f"{label}: {name!r} has shape {shape}; only the batch axis may vary")
    if in_shape[0] == -1:
        if api == "bindings":
            low, _, high = engine.get_profile_shape(0, in_index)
        else:
            low, _, high = engine.get_tensor_profile_shape(in_name, 0)
        min_batch, max_batch = int(low[0]), int(high[0])
    else:
        min_batch = max_batch = in_shape[0]
    return EngineIO(
        input=TensorSpec(in_name, (-1, *in_shape[1:]), in_dtype.name),
        output=TensorSpec(out_name, (-1, *out_shape[1:]), out_dtype.name),
        input_index=in_index,
        output_index=out_index,
        min_batch=min_batch,
        max_batch=max_batch,
    )


# --- the engine ----------------------------------------------------------------------------


class _TrtState:
    """Everything CUDA-side of one loaded engine. Only ever touched on the CUDA thread."""

    def __init__(self, session: TrtSession, engine: Any, io: EngineIO, label: str) -> None:
        self.session = session
        self.io = io
        self.label = label
        cuda = self.cuda = session.cuda
        self.engine = engine
        self.context = engine.create_execution_context()
        if self.context is None:
            raise EngineError(f"{label}: could not create an execution context (out of memory?)")
        in_elems = int(np.prod(io.input.sample_shape, dtype=np.int64))
        out_elems = int(np.prod(io.output.sample_shape, dtype=np.int64))
        # Pinned host buffers and device buffers sized once for the largest batch.
        self.host_in = cuda.pagelocked_empty(io.max_batch * in_elems, np.dtype(io.input.dtype))
        self.host_out = cuda.pagelocked_empty(io.max_batch * out_elems, np.dtype(io.output.dtype))
        self.device_in = cuda.mem_alloc(max(1, self.host_in.nbytes))
        self.device_out = cuda.mem_alloc(max(1, self.host_out.nbytes))
        self.stream = cuda.Stream()
        if session.api == "tensors":
            self.context.set_tensor_address(io.input.name, int(self.device_in))
            self.context.set_tensor_address(io.output.name, int(self.device_out))
        else:
            self.bindings = [0] * engine.num_bindings
            self.bindings[io.input_index] = int(self.device_in)
            self.bindings[io.output_index] = int(self.device_out)

    def run(self, x: np.ndarray) -> np.ndarray:
        io = self.io
        out = np.empty((x.shape[0], *io.output.sample_shape), dtype=np.dtype(io.output.dtype))
        for offset, samples, batch in plan_batches(x.shape[0], io.min_batch, io.max_batch):
            out[offset : offset + samples] = self._run_batch(x[offset : offset + samples], batch)
        return out

    def _run_batch(self, x: np.ndarray, batch: int) -> np.ndarray:
        io, cuda = self.io, self.cuda
        in_shape = (batch, *io.input.sample_shape)
        host_in = self.host_in[: int(np.prod(in_shape))].reshape(in_shape)
        host_in[: x.shape[0]] = x
        if batch > x.shape[0]:
            host_in[x.shape[0] :] = 0
        out_shape = (batch, *io.output.sample_shape)
        host_out = self.host_out[: int(np.prod(out_shape))].reshape(out_shape)
        cuda.memcpy_htod_async(self.device_in, host_in, self.stream)
        if self.session.api == "tensors":
            if not self.context.set_input_shape(io.input.name, in_shape):
                raise EngineError(f"{self.label}: TensorRT refused input shape {in_shape}")
            ok = self.context.execute_async_v3(stream_handle=self.stream.handle)
        else:
            if not self.context.set_binding_shape(io.input_index, in_shape):
                raise EngineError(f"{self.label}: TensorRT refused input shape {in_shape}")
            ok = self.context.execute_async_v2(
                bindings=self.bindings, stream_handle=self.stream.handle
            )
        if not ok:
            raise EngineError(f"{self.label}: TensorRT failed to enqueue the inference")
        cuda.memcpy_dtoh_async(host_out, self.device_out, self.stream)
        self.stream.synchronize()
        result: np.ndarray = host_out[: x.shape[0]].copy()
        return result

    def release(self) -> None:
        """Free the device buffers, the context and the engine (on the CUDA thread)."""
        self.session._forget(self)
        for name in ("device_in", "device_out"):
            allocation = getattr(self, name, None)
            if allocation is not None:
                allocation.free()
                setattr(self, name, None)
        self.context = None
        self.engine = None
        self.stream = None
        self.host_in = self.host_out = None


class TrtEngine(BaseEngine):
    """A segment ``[start, end)`` served by a TensorRT engine on the session's CUDA thread."""

    backend = "trt"

    def __init__(
        self,
        start: int,
        end: int,
        input_spec: TensorSpec,
        output_spec: TensorSpec,
        session: TrtSession,
        state: _TrtState,
    ) -> None:
        super().__init__(start, end, input_spec, output_spec)
        self._session = session
        self._state: _TrtState | None = state

    @classmethod
    def load(
        cls,
        path: Path,
        *,
        start: int,
        end: int,
        session: TrtSession,
        warmup: bool = True,
        refit_from: Path | None = None,
    ) -> TrtEngine:
        """Deserialise the engine file at ``path``, refit a weight-stripped plan from the
        segment's ONNX file ``refit_from``, allocate its buffers, run a warm-up."""
        path = Path(path)
        label = f"trt[{start},{end})"
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ArtifactError(f"{label}: cannot read engine file {path}: {exc}") from exc

        def job() -> _TrtState:
            engine = session.deserialize(data, f"engine {path}")
            session.refit(engine, refit_from, label)
            io = _engine_io(session.trt, engine, session.api, label)
            state = _TrtState(session, engine, io, label)
            session._register(state)
            try:
                if warmup:
                    for batch in sorted({io.min_batch, io.max_batch}):
                        state.run(np.zeros((batch, *io.input.sample_shape), io.input.dtype))
            except BaseException:
                state.release()
                raise
            return state

        state = session.run(job, f"loading {path}")
        return cls(start, end, state.io.input, state.io.output, session, state)

    @property
    def max_batch(self) -> int:
        return self._require_state().io.max_batch

    def _require_state(self) -> _TrtState:
        if self._state is None:
            raise EngineError(f"{self.label} is closed")
        return self._state

    def _infer_impl(self, x: np.ndarray) -> np.ndarray:
        state = self._require_state()
        return self._session.run(lambda: state.run(x), f"running {self.label}")

    def close(self) -> None:
        """Free this engine's GPU memory now (e.g. when a fused engine replaces it)."""
        state, self._state = self._state, None
        if state is None or self._session.worker.closed:
            return
        self._session.run(state.release, f"releasing {self.label}")


def open_engine(
    path: Path, start: int, end: int, *, session: TrtSession, warmup: bool = True,
    refit_from: Path | None = None,
) -> TrtEngine:
    """The repository's entry point: ``TrtEngine.load`` for segment ``[start, end)``.

    ``session`` is the process's one ``TrtSession``, created at start-up (``TrtSession.start``)
    and passed down; TensorRT engines cannot be opened without it.
    """
    return TrtEngine.load(path, start=start, end=end, session=session, warmup=warmup,
                          refit_from=refit_from)
