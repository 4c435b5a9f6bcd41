"""cluster.toml: a valid file round-trips, and every error names the file and the field."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from appliance.config import (
    ClusterConfig,
    ConfigError,
    default_repo,
    dump_toml,
    load_config,
    parse_config,
)
from engines.errors import ArmdiError

KEY_HEX = "00112233445566778899aabbccddeeff"

VALID = """\
[cluster]
model = "efficientnet_lite0"     # model id in the repository
repo = "models"
mode = "edgepipe"
key_file = "cluster.key"
wire_dtype = "float16"
max_frame_mb = 64
queue_depth = 8
request_timeout_s = 10.0
backend = "auto"

[source]
name = "source"
data_addr = "tcp://192.168.1.10:5600"
control_addr = "tcp://192.168.1.10:5601"
run_blocks = true
http_host = "0.0.0.0"
http_port = 8000

[[workers]]
name = "w1"
data_addr = "tcp://192.168.1.11:5600"
control_addr = "tcp://192.168.1.11:5601"
slowdown = 1.0
cpus = [0]
threads = 1
bandwidth_mbps = 1000

[[workers]]
name = "w2"
data_addr = "ipc:///tmp/armdi-w2.data"
control_addr = "inproc://w2-control"
slowdown = 2.5
cpus = [1, 2]
threads = 2
max_blocks = 10
latency_ms = 0.5
"""


def _minimal(**cluster: Any) -> dict[str, Any]:
    return {
        "cluster": {"model": "m", **cluster},
        "source": {"data_addr": "tcp://127.0.0.1:5600", "control_addr": "tcp://127.0.0.1:5601"},
        "workers": [
            {"name": "w1", "data_addr": "tcp://127.0.0.1:5610", "control_addr": "ipc:///tmp/w1"}
        ],
    }


@pytest.fixture
def valid_file(tmp_path: Path) -> Path:
    (tmp_path / "cluster.key").write_text(KEY_HEX + "\n")
    path = tmp_path / "cluster.toml"
    path.write_text(VALID)
    return path


def _error(path: Path, text: str) -> str:
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert isinstance(info.value, ArmdiError)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message
    return message


# --- a valid file ---------------------------------------------------------------------------


def test_valid_file_parses(valid_file: Path) -> None:
    config = load_config(valid_file)
    assert config.cluster.model == "efficientnet_lite0"
    assert config.cluster.mode == "edgepipe"
    assert config.cluster.repo == valid_file.parent / "models"  # relative to the file
    assert config.cluster.key_file == valid_file.parent / "cluster.key"
    assert config.cluster.hmac_key() == bytes.fromhex(KEY_HEX)
    assert config.cluster.wire_dtype == "float16"
    assert config.cluster.max_frame_bytes == 64 * 1024 * 1024
    assert [n.name for n in config.nodes] == ["source", "w1", "w2"]
    w1, w2 = config.workers
    assert w1.cpus == (0,)
    assert w1.bandwidth_mbps == 1000.0
    assert w1.bandwidth_Bps == 125e6
    assert w2.bandwidth_Bps == math.inf
    assert w2.slowdown == 2.5
    assert w2.max_blocks == 10
    assert config.source.run_blocks is True
    assert config.source.http_port == 8000


def test_config_is_frozen(valid_file: Path) -> None:
    config = load_config(valid_file)
    with pytest.raises(ValueError):
        setattr(config.cluster, "model", "other")  # noqa: B010 - frozen: must raise
    assert hash(config.source) == hash(config.source)


def test_round_trip_through_dump_toml(valid_file: Path, tmp_path: Path) -> None:
    config = load_config(valid_file)
    text = dump_toml(config)
    assert "# model id in the repository" in text  # every key carries its comment
    assert text.count("[[workers]]") == 2
    copy = tmp_path / "copy.toml"
    copy.write_text(text)
    assert load_config(copy) == config
    assert dump_toml(load_config(copy)) == text


def test_round_trip_with_awkward_strings(tmp_path: Path) -> None:
    data = _minimal(key=KEY_HEX, mode="ddi")
    data["cluster"]["repo"] = str(tmp_path / 'we"ird\\dir\tname')
    config = parse_config(data)
    path = tmp_path / "c.toml"
    path.write_text(dump_toml(config))
    assert load_config(path) == config
    assert load_config(path).cluster.hmac_key() == bytes.fromhex(KEY_HEX)


def test_defaults() -> None:
    config = ClusterConfig.model_validate(_minimal())
    assert config.cluster.mode == "armdi"
    assert config.cluster.repo == default_repo()
    assert config.cluster.hmac_key() is None
    assert config.cluster.wire_dtype == "float32"
    assert config.cluster.backend == "auto"
    assert config.source.name == "source"
    assert config.workers[0].slowdown == 1.0
    assert config.workers[0].threads == 1
    assert config.workers[0].cpus is None


def test_repo_expands_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    config = parse_config(_minimal(repo="~/armdi-models"), base_dir=Path("/elsewhere"))
    assert config.cluster.repo == tmp_path / "armdi-models"


def test_local_mode_needs_no_workers() -> None:
    data = _minimal(mode="local")
    del data["workers"]
    assert parse_config(data).workers == ()


def test_worker_lookup() -> None:
    config = parse_config(_minimal())
    assert config.worker("w1").data_addr == "tcp://127.0.0.1:5610"
    assert config.node("source") is config.source
    assert config.node("w1") is config.workers[0]
    with pytest.raises(ConfigError, match=r"no worker named 'w9'; known workers: w1"):
        config.worker("w9")
    with pytest.raises(ConfigError, match="that is the source"):
        config.worker("source")


# --- errors name the file and the field --------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml: no such file"):
        load_config(tmp_path / "nope.toml")


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)


def test_toml_syntax_error_gives_the_line(tmp_path: Path) -> None:
    message = _error(tmp_path / "cluster.toml", '[cluster]\nmodel = "m"\nmode = edgepipe\n')
    assert "invalid TOML" in message
    assert "line 3" in message


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            'data_addr = "tcp://192.168.1.11:5600"',
            'data_addr = "udp://192.168.1.11:5600"',
            "workers[0].data_addr: must start with tcp://, tls+tcp://, ipc:// or inproc://",
        ),
        (
            'data_addr = "ipc:///tmp/armdi-w2.data"',
            'data_addr = "tcp://192.168.1.12"',
            "workers[1].data_addr: tcp address must be tcp://HOST:PORT",
        ),
        (
            'control_addr = "tcp://192.168.1.10:5601"',
            'control_addr = "tcp://192.168.1.10:99999"',
            "source.control_addr: tcp address must be tcp://HOST:PORT with a port in 1..65535",
        ),
        ('mode = "edgepipe"', 'mode = "fast"', "cluster.mode: should be 'armdi', 'edgepipe'"),
        ("slowdown = 2.5", "slowdown = 0.5", "workers[1].slowdown: should be greater than or"),
        ("threads = 2", "threads = 0", "workers[1].threads:"),
        ("cpus = [1, 2]", "cpus = [1, 1]", "workers[1].cpus: a CPU is listed twice"),
        ("cpus = [1, 2]", "cpus = [1, -2]", "workers[1].cpus[1]:"),
        ('wire_dtype = "float16"', 'wire_dtype = "int8"', "cluster.wire_dtype:"),
        ('backend = "auto"', 'backend = "cuda"', "cluster.backend:"),
        ("queue_depth = 8", "queue_depth = 0", "cluster.queue_depth:"),
        ("max_frame_mb = 64", 'max_frame_mb = "big"', "cluster.max_frame_mb:"),
        ("http_port = 8000", "http_port = 70000", "source.http_port:"),
        ('name = "w2"', 'name = "w 2"', "workers[1].name:"),
        ("bandwidth_mbps = 1000", "bandwith_mbps = 1000", "workers[0].bandwith_mbps: unknown key"),
        ('backend = "auto"', 'backend = "auto"\ncolour = "red"', "cluster.colour: unknown key"),
        ('name = "w2"', 'name = "w1"', "workers[1].name: duplicate name 'w1' (also workers[0])"),
        ('name = "w1"', 'name = "source"', "workers[0].name: duplicate name 'source'"),
        (
            'control_addr = "inproc://w2-control"',
            'control_addr = "tcp://192.168.1.11:5600"',
            "workers[1].control_addr: address 'tcp://192.168.1.11:5600' is already used by "
            "workers[0].data_addr",
        ),
        ('model = "efficientnet_lite0"', 'model = ""', "cluster.model:"),
        (
            'model = "efficientnet_lite0"     # model id in the repository',
            "",
            "cluster.model: required",
        ),
        (
            'key_file = "cluster.key"',
            'key_file = "cluster.key"\nkey = "00"',
            "cluster.key: give either",
        ),
        ('key_file = "cluster.key"', 'key = "zz"', "cluster.key: the key must be hex digits"),
        (
            'key_file = "cluster.key"',
            'key = "abcd"',
            "cluster.key: the key must be at least 16 bytes",
        ),
        ('key_file = "cluster.key"', 'key_file = "missing.key"', "cluster.key_file: cannot read"),
        ("run_blocks = true", 'run_blocks = "maybe"', "source.run_blocks:"),
    ],
)
def test_each_error_names_the_field(valid_file: Path, old: str, new: str, expected: str) -> None:
    assert old in VALID
    message = _error(valid_file, VALID.replace(old, new, 1))
    assert expected in message, message


def test_key_file_must_hold_hex(valid_file: Path) -> None:
    (valid_file.parent / "cluster.key").write_text("not a key")
    message = _error(valid_file, VALID)
    assert "cluster.key_file:" in message
    assert "hex" in message


def test_every_problem_is_reported(valid_file: Path) -> None:
    text = VALID.replace('mode = "edgepipe"', 'mode = "fast"').replace("threads = 2", "threads = 0")
    valid_file.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(valid_file)
    assert len(info.value.problems) == 2
    assert any(p.startswith("cluster.mode:") for p in info.value.problems)
    assert any(p.startswith("workers[1].threads:") for p in info.value.problems)


def test_modes_that_need_workers() -> None:
    for mode in ("armdi", "edgepipe", "ddi"):
        data = _minimal(mode=mode)
        data["workers"] = []
        with pytest.raises(ConfigError, match=rf"workers: mode '{mode}' needs at least one"):
            parse_config(data, origin="cluster.toml")


def test_local_mode_needs_the_source_to_compute() -> None:
    data = _minimal(mode="local")
    data["source"]["run_blocks"] = False
    with pytest.raises(ConfigError, match=r"source\.run_blocks: mode 'local'"):
        parse_config(data)


def test_missing_sections(tmp_path: Path) -> None:
    message = _error(tmp_path / "cluster.toml", '[cluster]\nmodel = "m"\nmode = "local"\n')
    assert "source: required, but missing" in message
    message = _error(tmp_path / "cluster.toml", '[cluster]\nmodel = "m"\n[worker]\nname = "x"\n')
    assert "worker: unknown key; did you mean 'workers'?" in message


def test_parse_config_names_its_origin() -> None:
    data = _minimal()
    data["workers"][0]["data_addr"] = "http://x:1"
    with pytest.raises(ConfigError, match=r"^up\.toml: workers\[0\]\.data_addr: must start"):
        parse_config(data, origin="up.toml")
