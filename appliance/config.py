"""The cluster configuration, ``cluster.toml``: parsed once into frozen models, passed down.

    [cluster]      the model, the mode and the settings every node shares
    [source]       the node that owns the input data, the front end and the results
    [[workers]]    the other nodes, in chain order

``load_config(path)`` reads and validates a file; ``parse_config(data)`` a mapping;
``dump_toml(config)`` writes one back (``armdi up`` does). Every problem is a ``ConfigError``
whose one-line message names the file and the field, e.g.
``cluster.toml: workers[1].data_addr: must start with tcp://, ipc:// or inproc://``.
Relative paths in a file (``repo``, ``key_file``) are relative to the file's directory.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from appliance.wire.transport import TlsFiles
from engines.errors import ArmdiError
from engines.repository import default_repo

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = [
    "ADDRESS_SCHEMES",
    "ClusterConfig",
    "ClusterSection",
    "ConfigError",
    "Mode",
    "NodeConfig",
    "SourceConfig",
    "WorkerConfig",
    "default_repo",
    "dump_toml",
    "load_config",
    "parse_config",
]

ADDRESS_SCHEMES = ("tcp://", "tls+tcp://", "ipc://", "inproc://")
MIN_KEY_BYTES = 16

Mode = Literal["armdi", "edgepipe", "ddi", "hybrid", "local", "auto"]
MODES_NEEDING_WORKERS: tuple[Mode, ...] = ("armdi", "edgepipe", "ddi", "hybrid", "auto")


class ConfigError(ArmdiError):
    """``cluster.toml`` is missing, unreadable or invalid; ``problems`` lists each one."""

    def __init__(self, message: str, problems: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.problems = problems or (message,)





class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _resolve(path: Path, info: ValidationInfo) -> Path:
    """Expand ``~``; make a relative path relative to the config file's directory."""
    path = path.expanduser()
    base = (info.context or {}).get("base_dir")
    if base is not None and not path.is_absolute():
        path = Path(base) / path
    return path


def _check_address(value: str) -> str:
    if not value.startswith(ADDRESS_SCHEMES):
        raise ValueError("must start with tcp://, tls+tcp://, ipc:// or inproc://")
    scheme, rest = value.split("://", 1)
    if not rest or any(c.isspace() for c in value):
        raise ValueError(f"{scheme}:// address needs a non-empty name without spaces")
    if scheme in ("tcp", "tls+tcp"):
        host, colon, port = rest.rpartition(":")
        if not (colon and host and port.isdigit() and 1 <= int(port) <= 65535):
            raise ValueError(f"{scheme} address must be {scheme}://HOST:PORT with a port in "
                             "1..65535")
    return value


class ClusterSection(_Frozen):
    """``[cluster]``: what the cluster serves and the settings every node shares."""

    model: str = Field(min_length=1, description="model id in the repository")
    repo: Path = Field(
        default_factory=default_repo,
        description="model repository directory (default: the user's data dir for armdi)",
    )
    mode: Mode = Field(
        "armdi",
        description="armdi (adaptive, resilient) | edgepipe (static optimum) | ddi "
                    "(data-distributed: every worker runs the whole model) | hybrid (DDI "
                    "over chains of chain_workers) | local | auto (local, ddi, armdi or "
                    "hybrid: the one predicted fastest, switched as speeds change)",
    )
    chain_workers: int = Field(
        2, ge=1, description="mode hybrid: workers per chain (the chains run side by side)"
    )
    ddi_input: Literal["pixels", "jpeg"] = Field(
        "pixels", description="mode ddi: image requests travel as uint8 pixels, or as the "
                              "encoded image (jpeg), decoded and preprocessed on the worker"
    )
    key_file: Path | None = Field(
        None, description="file holding the hex HMAC key for frames (relative to this file)"
    )
    key: str | None = Field(None, description="the HMAC key for frames, in hex (or key_file)")
    wire_dtype: Literal["float32", "float16"] = Field(
        "float32", description="dtype of activations on the wire: float32 | float16"
    )
    max_frame_mb: float = Field(64.0, gt=0, description="largest frame accepted, in MiB")
    queue_depth: int = Field(8, ge=1, description="frames a node queues before pushing back")
    request_timeout_s: float = Field(
        10.0, gt=0,
        description="a request's deadline in seconds (re-sent up to 3 times within it)"
    )
    backend: Literal["auto", "ort", "trt"] = Field(
        "auto", description="engine backend: auto | ort (ONNX Runtime) | trt (TensorRT)"
    )
    emulate_compute: bool = Field(
        False, description="benchmarks: nodes wait their segment's profiled time (times "
                           "emulate_scale and the slowdown) and output zeros instead of "
                           "computing, so many workers run faithfully on few cores"
    )
    emulate_scale: float = Field(1.0, gt=0, description="profiled times are multiplied by this "
                                                        "under emulate_compute")
    emulate_times: Path | None = Field(
        None, description="benchmarks, with emulate_compute: a JSON file of measured segment "
                          "times, {\"start:end\": ms}, waited instead of the blocks' profiled "
                          "sum for the ranges it lists (relative to this file)"
    )
    heartbeat_ms: float = Field(
        100.0, gt=0, le=10_000, description="workers send the source a heartbeat this often"
    )
    hysteresis: float = Field(
        0.02, ge=0, le=0.5,
        description="mode armdi: a boundary moves only when the pair's predicted bottleneck "
                    "drops by more than this fraction (lower: closer to equal stage times, "
                    "more moves on noise)"
    )
    emulate_links: bool = Field(
        False, description="benchmarks: each node's sends occupy its outgoing link "
                           "(bandwidth_mbps) for size / rate, one after another, as a slow link "
                           "would; links on one machine then behave like the configured ones"
    )
    link_delay_ms: float = Field(
        0.0, ge=0, le=10_000, description="benchmarks: every data frame reaches the next node "
                                          "this much later (an emulated one-way delay, added "
                                          "by the sender's transport; control messages are not "
                                          "delayed)"
    )
    phi_threshold: float = Field(
        8.0, gt=0, description="a worker is declared dead when the failure detector's phi "
                               "(how improbable its silence is) passes this"
    )
    acceptable_pause_ms: float = Field(
        100.0, ge=0, description="silence the failure detector always tolerates (GC, a busy "
                                 "scheduler), on top of the usual heartbeat interval"
    )
    max_silence_ms: float = Field(
        2000.0, gt=0, description="a worker silent this long is declared dead whatever phi "
                                  "says (the ceiling of the adaptive threshold)"
    )
    successors: int = Field(
        2, ge=1, le=16, description="membership: each worker knows its next N live successors "
                                    "and fails over to the next when one stops taking frames"
    )
    stabilise_ms: float = Field(
        200.0, gt=0, le=60_000, description="membership: each worker asks its successor for "
                                            "its successor list this often and repairs its own"
    )
    min_workers: int = Field(
        0, ge=0,
        description="the first N workers each run at least one block, even where the optimum "
                    "would leave them out (for demos and tests)"
    )
    tls_ca: Path | None = Field(
        None, description="CA certificate (PEM) of tls+tcp:// links, from armdi keys init"
    )

    @field_validator("repo", "key_file", "tls_ca", "emulate_times")
    @classmethod
    def _paths(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return None if value is None else _resolve(value, info)

    @field_validator("key")
    @classmethod
    def _hex_key(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            if info.data.get("key_file") is not None:
                raise ValueError("give either key or key_file, not both")
            _parse_key(value)
        return value

    @property
    def max_frame_bytes(self) -> int:
        return int(self.max_frame_mb * 1024 * 1024)

    def hmac_key(self) -> bytes | None:
        """The frame key (``key`` or the contents of ``key_file``), or None for unsigned frames."""
        if self.key is not None:
            return _parse_key(self.key)
        if self.key_file is None:
            return None
        try:
            text = self.key_file.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not hex text"
            raise ConfigError(f"cluster.key_file: cannot read {self.key_file}: {reason}") from exc
        try:
            return _parse_key(text.strip())
        except ValueError as exc:
            raise ConfigError(f"cluster.key_file: {self.key_file}: {exc}") from exc


def _parse_key(text: str) -> bytes:
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ValueError("the key must be hex digits") from None
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(
            f"the key must be at least {MIN_KEY_BYTES} bytes ({2 * MIN_KEY_BYTES} hex digits), "
            f"got {len(key)}"
        )
    return key


class NodeConfig(_Frozen):
    """What the source and the workers share: identity, addresses, emulation, link estimate."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        max_length=64,
        description="unique node name (letters, digits, _ . -)",
    )
    data_addr: str = Field(description="where this node listens for activation frames")
    control_addr: str = Field(description="where this node listens for control messages")
    slowdown: float = Field(
        1.0, ge=1.0, description="emulation: compute, then wait (slowdown - 1) x as long"
    )
    cpus: tuple[Annotated[int, Field(ge=0)], ...] | None = Field(
        None, description="CPU cores to pin this node to (default: no pinning)"
    )
    threads: int = Field(1, ge=1, description="engine threads")
    bandwidth_mbps: float | None = Field(
        None, gt=0, description="outgoing link estimate for the allocator, Mbit/s"
    )
    latency_ms: float = Field(
        0.0, ge=0, description="outgoing per-hop latency estimate for the allocator, ms"
    )
    max_blocks: int | None = Field(
        None, ge=0, description="memory cap: the most blocks this node may run"
    )
    tls_cert: Path | None = Field(
        None, description="this node's private key and certificate, one PEM file (mode 0600)"
    )

    @field_validator("data_addr", "control_addr")
    @classmethod
    def _address(cls, value: str) -> str:
        return _check_address(value)

    @field_validator("tls_cert")
    @classmethod
    def _cert_path(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return None if value is None else _resolve(value, info)

    @property
    def uses_tls(self) -> bool:
        return any(a.startswith("tls+tcp://") for a in (self.data_addr, self.control_addr))

    @field_validator("cpus")
    @classmethod
    def _distinct_cpus(cls, value: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError(f"a CPU is listed twice: {list(value)}")
        return value

    @property
    def bandwidth_Bps(self) -> float:
        """The link estimate in bytes/s (``inf`` when none is given)."""
        return float("inf") if self.bandwidth_mbps is None else self.bandwidth_mbps * 1e6 / 8


class SourceConfig(NodeConfig):
    """``[source]``: owns the inputs, the front end, and receives the results."""

    name: str = Field(
        "source",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        max_length=64,
        description="unique node name (letters, digits, _ . -)",
    )
    run_blocks: bool = Field(True, description="the source may run the first segment itself")
    http_host: str = Field("127.0.0.1", min_length=1,
                           description="front end listen host (127.0.0.1: this machine only)")
    http_port: int = Field(8000, ge=0, le=65535, description="front end port (0: any free one)")


class WorkerConfig(NodeConfig):
    """``[[workers]]``: one worker; the order of the entries is the chain order."""


class ClusterConfig(_Frozen):
    """The whole ``cluster.toml``."""

    def tls_files(self, name: str) -> TlsFiles | None:
        """Node ``name``'s TLS files when the cluster's links use TLS, else None."""
        node = self.node(name)
        if not node.uses_tls or self.cluster.tls_ca is None or node.tls_cert is None:
            return None
        return TlsFiles(ca=self.cluster.tls_ca, cert_key=node.tls_cert)

    cluster: ClusterSection
    source: SourceConfig
    workers: tuple[WorkerConfig, ...] = ()

    @model_validator(mode="after")
    def _consistent(self) -> ClusterConfig:
        problems: list[str] = []
        names: dict[str, str] = {}
        addresses: dict[str, str] = {}
        for where, node in self._located_nodes():
            if node.name in names:
                problems.append(
                    f"{where}.name: duplicate name {node.name!r} (also {names[node.name]})"
                )
            names.setdefault(node.name, where)
            for field in ("data_addr", "control_addr"):
                address = getattr(node, field)
                if address in addresses:
                    problems.append(
                        f"{where}.{field}: address {address!r} is already used by "
                        f"{addresses[address]}"
                    )
                addresses.setdefault(address, f"{where}.{field}")
        tls_nodes = [(where, node) for where, node in self._located_nodes() if node.uses_tls]
        if tls_nodes and self.cluster.tls_ca is None:
            problems.append(f"cluster.tls_ca: {tls_nodes[0][0]} uses tls+tcp://, which needs "
                            "the cluster's CA certificate (armdi keys init writes ca.crt)")
        for where, node in tls_nodes:
            if node.tls_cert is None:
                problems.append(f"{where}.tls_cert: a tls+tcp:// node needs its key and "
                                f"certificate (armdi keys init writes nodes/{node.name}.pem)")
        if tls_nodes and len(tls_nodes) != len(self._located_nodes()):
            plain = next(w for w, n in self._located_nodes() if not n.uses_tls)
            problems.append(f"{plain}: every node must use tls+tcp:// once one does "
                            f"({tls_nodes[0][0]} does)")
        mode = self.cluster.mode
        if mode in MODES_NEEDING_WORKERS and not self.workers:
            problems.append(
                f"workers: mode {mode!r} needs at least one [[workers]] entry "
                '(or set cluster.mode = "local")'
            )
        if self.cluster.min_workers > len(self.workers):
            problems.append(
                f"cluster.min_workers: {self.cluster.min_workers} workers must run blocks, but "
                f"only {len(self.workers)} [[workers]] are configured"
            )
        if mode == "local" and not self.source.run_blocks:
            problems.append(
                "source.run_blocks: mode 'local' runs the whole model on the source; "
                "set run_blocks = true"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _located_nodes(self) -> list[tuple[str, NodeConfig]]:
        located: list[tuple[str, NodeConfig]] = [("source", self.source)]
        located += [(f"workers[{i}]", w) for i, w in enumerate(self.workers)]
        return located

    @property
    def nodes(self) -> tuple[NodeConfig, ...]:
        """The chain as configured: the source first, then the workers in order."""
        return (self.source, *self.workers)

    def worker(self, name: str) -> WorkerConfig:
        """The worker called ``name``; ``ConfigError`` listing the known names if none is."""
        for worker in self.workers:
            if worker.name == name:
                return worker
        known = ", ".join(w.name for w in self.workers) or "none"
        hint = " (that is the source)" if name == self.source.name else ""
        raise ConfigError(f"no worker named {name!r}{hint}; known workers: {known}")

    def node(self, name: str) -> NodeConfig:
        """The source or the worker called ``name``."""
        return self.source if name == self.source.name else self.worker(name)


# --- reading -------------------------------------------------------------------------------


def load_config(path: str | os.PathLike[str]) -> ClusterConfig:
    """Read and validate ``cluster.toml`` (the key file too, if one is named)."""
    origin = os.fspath(path)
    file = Path(origin)
    try:
        with file.open("rb") as stream:
            data = tomllib.load(stream)
    except FileNotFoundError:
        raise ConfigError(f"{origin}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{origin}: cannot read: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{origin}: invalid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{origin}: invalid TOML: not UTF-8 ({exc.reason})") from exc
    config = parse_config(data, origin=origin, base_dir=file.absolute().parent)
    try:
        config.cluster.hmac_key()
    except ConfigError as exc:
        raise ConfigError(f"{origin}: {exc}") from exc
    return config


def parse_config(
    data: Mapping[str, Any], *, origin: str = "<config>", base_dir: Path | None = None
) -> ClusterConfig:
    """Validate a parsed TOML mapping; ``origin`` names it in errors, ``base_dir`` anchors
    relative paths (the current directory when None)."""
    try:
        return ClusterConfig.model_validate(dict(data), context={"base_dir": base_dir})
    except ValidationError as exc:
        problems = tuple(_describe(error) for error in exc.errors())
        raise ConfigError(f"{origin}: " + "; ".join(problems), problems) from None


_SECTIONS: dict[str, type[BaseModel]] = {
    "cluster": ClusterSection,
    "source": SourceConfig,
    "workers": WorkerConfig,
}


def _describe(error: Mapping[str, Any]) -> str:
    """One pydantic error as ``field.path: what is wrong``."""
    loc = tuple(error.get("loc", ()))
    kind = error.get("type", "")
    value = error.get("input")
    if kind == "value_error" and "error" in error.get("ctx", {}):
        message = str(error["ctx"]["error"])
    elif kind == "missing":
        message = "required, but missing"
    elif kind == "extra_forbidden":
        message = "unknown key" + _suggest(loc)
    else:
        message = str(error.get("msg", "invalid")).replace("Input should", "should")
        if isinstance(value, (str, int, float, bool)):
            message += f", got {value!r}"
    path = _path(loc)
    return f"{path}: {message}" if path else message


def _path(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _suggest(loc: tuple[Any, ...]) -> str:
    model = _SECTIONS.get(loc[0]) if len(loc) > 1 else ClusterConfig
    if model is None:
        return ""
    known = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), known, n=1)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f" (known keys: {', '.join(known)})"


# --- writing -------------------------------------------------------------------------------


def dump_toml(config: ClusterConfig) -> str:
    """``cluster.toml`` text for ``config``, each key commented; ``load_config`` reads it back
    to an equal config (paths are written as they are held: absolute after ``load_config``)."""
    lines = ["# armdi cluster configuration", ""]
    lines += _table("[cluster]", config.cluster)
    lines += _table("[source]", config.source)
    for worker in config.workers:
        lines += _table("[[workers]]", worker)
    return "\n".join(lines).rstrip() + "\n"


def _table(header: str, section: BaseModel) -> list[str]:
    lines = [header]
    for name, field in type(section).model_fields.items():
        value = getattr(section, name)
        if value is None:
            continue  # TOML has no null: an absent key means the default
        line = f"{name} = {_toml_value(value)}"
        if field.description:
            line += f"  # {field.description}"
        lines.append(line)
    lines.append("")
    return lines


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f"}
_ESCAPES["\r"] = "\\r"
_CONTROL = re.compile(r'["\\\x00-\x1f\x7f]')


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, (str, Path)):
        text = str(value)
        escaped = _CONTROL.sub(lambda m: _ESCAPES.get(m[0], f"\\u{ord(m[0]):04x}"), text)
        return f'"{escaped}"'
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")
