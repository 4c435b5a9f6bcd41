#!/usr/bin/env bash
# Provision an NVIDIA Jetson (JetPack 6 / L4T R36) for armdi: apt packages, a venv that sees
# the system TensorRT, pycuda, armdi itself, optional power/clock/swap/desktop settings, the
# TensorRT engines of one model, and a systemd unit for this device's role.
#
# Idempotent: every step checks the current state first and says "unchanged: ..." or
# "changed: ..."; a second run changes nothing. --dry-run prints the plan and changes nothing.
# See docs/jetson.md.
set -euo pipefail

PROG=jetson_setup.sh
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# ---------------------------------------------------------------------------- settings
CUDA_DIR=/usr/local/cuda
PYCUDA_REQ='pycuda>=2022.2'
EXPECTED_PYTHON=3.10
APT_PACKAGES=(
    python3-venv python3-dev build-essential
    python3-libnvinfer python3-libnvinfer-dev
    nvidia-cuda-dev
)
# Paths on the target system; each is prefixed with --root / ARMDI_ROOT when touched.
OPT_DIR=/opt/armdi
VENV_DIR=$OPT_DIR/venv
STATE_DIR=$OPT_DIR/state
DATA_HOME=/var/lib
REPO_DIR=$DATA_HOME/armdi
CONF_DIR=/etc/armdi
CONF_FILE=$CONF_DIR/cluster.toml
KEYS_DIR=$CONF_DIR/keys
UNIT_DIR=/etc/systemd/system
SWAP_FILE=/swapfile
FSTAB=/etc/fstab
CLOCKS_UNIT=armdi-jetson-clocks.service

usage() {
    cat <<EOF
Usage: $PROG [options]

Provision this Jetson (JetPack 6 / L4T R36) for armdi. Safe to rerun: each step checks first
and reports "unchanged" or "changed"; a second run changes nothing.

Options:
  --role node|source   systemd unit to install: 'armdi node' (a worker, default) or
                       'armdi serve' (the source and web front end)
  --config PATH        cluster.toml; copied to $CONF_FILE, which the unit reads.
                       Needed unless $CONF_FILE already exists.
  --name NAME          node name for 'armdi node' (default: this host's name)
  --model MODEL        model whose TensorRT engines are built (default: efficientnet_lite0,
                       or the model in --model-from)
  --keys DIR           install this node's keys from DIR, made by 'armdi keys init': the
                       cluster key, the CA certificate and nodes/NAME.pem, into
                       $KEYS_DIR (directory 0700, private keys 0600; never ca.key)
  --model-from FILE    install the model from FILE, a pack made by 'armdi pack' on a machine
                       with the builder extra (verified by 'armdi unpack'); engines are then
                       built from its segment files, with no torch on this device
  --skip-build         do not build engines
  --power-mode N       set the power mode with 'nvpmodel -m N'
  --clocks             lock clocks at maximum with jetson_clocks, now and at every boot
  --swap SIZE          add a swapfile of SIZE (e.g. 8G) at $SWAP_FILE, with an fstab entry
                       (TensorRT engine builds need memory)
  --no-desktop         boot to the console (systemctl set-default multi-user.target)
  --src DIR            armdi source tree to install (default: this script's directory)
  --root DIR           prefix every path touched with DIR (for tests and image staging;
                       also ARMDI_ROOT). System commands still run on this machine.
  --dry-run            print every step and what would change; change nothing
  -y, --yes            do not ask before changing anything
  -h, --help           show this help

Environment: NV_TEGRA_RELEASE names the L4T release file (default /etc/nv_tegra_release).
EOF
}

die() {
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    exit 1
}

warn() {
    printf '%s: warning: %s\n' "$PROG" "$*" >&2
}

# ---------------------------------------------------------------------------- arguments
ROLE=node
CONFIG_SRC=
NODE_NAME=
MODEL=efficientnet_lite0
MODEL_GIVEN=0
MODEL_FROM=
KEYS_SRC=
SKIP_BUILD=0
POWER_MODE=
CLOCKS=0
SWAP_SIZE=
NO_DESKTOP=0
SRC_DIR=${ARMDI_SRC:-$SCRIPT_DIR}
ROOT=${ARMDI_ROOT:-}
ROOT_GIVEN=0
[[ -n $ROOT ]] && ROOT_GIVEN=1
DRY_RUN=0
ASSUME_YES=0

need_arg() {
    [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see --help)"
}

while [[ $# -gt 0 ]]; do
    case $1 in
        --role) need_arg "$@"; ROLE=$2; shift 2 ;;
        --role=*) ROLE=${1#*=}; shift ;;
        --config) need_arg "$@"; CONFIG_SRC=$2; shift 2 ;;
        --config=*) CONFIG_SRC=${1#*=}; shift ;;
        --name) need_arg "$@"; NODE_NAME=$2; shift 2 ;;
        --name=*) NODE_NAME=${1#*=}; shift ;;
        --model) need_arg "$@"; MODEL=$2; MODEL_GIVEN=1; shift 2 ;;
        --model=*) MODEL=${1#*=}; MODEL_GIVEN=1; shift ;;
        --keys) need_arg "$@"; KEYS_SRC=$2; shift 2 ;;
        --keys=*) KEYS_SRC=${1#*=}; shift ;;
        --model-from) need_arg "$@"; MODEL_FROM=$2; shift 2 ;;
        --model-from=*) MODEL_FROM=${1#*=}; shift ;;
        --skip-build) SKIP_BUILD=1; shift ;;
        --power-mode) need_arg "$@"; POWER_MODE=$2; shift 2 ;;
        --power-mode=*) POWER_MODE=${1#*=}; shift ;;
        --clocks) CLOCKS=1; shift ;;
        --swap) need_arg "$@"; SWAP_SIZE=$2; shift 2 ;;
        --swap=*) SWAP_SIZE=${1#*=}; shift ;;
        --no-desktop) NO_DESKTOP=1; shift ;;
        --src) need_arg "$@"; SRC_DIR=$2; shift 2 ;;
        --src=*) SRC_DIR=${1#*=}; shift ;;
        --root) need_arg "$@"; ROOT=$2; ROOT_GIVEN=1; shift 2 ;;
        --root=*) ROOT=${1#*=}; ROOT_GIVEN=1; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -y | --yes) ASSUME_YES=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
done

case $ROLE in
    node | source) ;;
    *) die "--role must be 'node' or 'source', not '$ROLE'" ;;
esac
[[ -z $POWER_MODE || $POWER_MODE =~ ^[0-9]+$ ]] ||
    die "--power-mode must be a number (see 'nvpmodel -p --verbose'), not '$POWER_MODE'"
[[ $MODEL =~ ^[A-Za-z0-9._/+-]+$ ]] || die "--model '$MODEL' contains unsupported characters"

# --model-from: a pack from 'armdi pack', whose first member is <model_id>/manifest.json.
PACK_SHA=
if [[ -n $MODEL_FROM ]]; then
    [[ -f $MODEL_FROM && -r $MODEL_FROM ]] || die "--model-from $MODEL_FROM: no such file"
    MODEL_FROM=$(cd "$(dirname "$MODEL_FROM")" && pwd)/$(basename "$MODEL_FROM")
    first=$(tar -tf "$MODEL_FROM" 2>/dev/null | sed -n 1p) || first=
    [[ $first =~ ^([A-Za-z0-9][A-Za-z0-9_.-]*)/manifest\.json$ ]] ||
        die "--model-from $MODEL_FROM is not a pack made by 'armdi pack' (make one with: armdi pack MODEL -o FILE.tar)"
    if [[ $MODEL_GIVEN -eq 1 && $MODEL != "${BASH_REMATCH[1]}" ]]; then
        die "--model-from $MODEL_FROM holds the model ${BASH_REMATCH[1]}, not --model $MODEL"
    fi
    MODEL=${BASH_REMATCH[1]}
    PACK_SHA=$(sha256sum "$MODEL_FROM" | cut -d' ' -f1)
fi

SWAP_BYTES=
if [[ -n $SWAP_SIZE ]]; then
    [[ $SWAP_SIZE =~ ^([0-9]+)([KMGT]?)i?B?$ ]] ||
        die "--swap must be a size such as 8G or 512M, not '$SWAP_SIZE'"
    SWAP_BYTES=${BASH_REMATCH[1]}
    case ${BASH_REMATCH[2]} in
        K) SWAP_BYTES=$((SWAP_BYTES * 1024)) ;;
        M) SWAP_BYTES=$((SWAP_BYTES * 1024 ** 2)) ;;
        G) SWAP_BYTES=$((SWAP_BYTES * 1024 ** 3)) ;;
        T) SWAP_BYTES=$((SWAP_BYTES * 1024 ** 4)) ;;
    esac
    ((SWAP_BYTES >= 40960)) || die "--swap $SWAP_SIZE is too small"
fi

# --root: absolute, without trailing slashes; "/" means no prefix.
if [[ -n $ROOT ]]; then
    [[ -d $ROOT ]] || die "--root $ROOT is not a directory"
    ROOT=$(cd "$ROOT" && pwd)
    if [[ $ROOT == / ]]; then
        ROOT=
        ROOT_GIVEN=0
    fi
fi

# ---------------------------------------------------------------------------- platform checks
ARCH=$(uname -m)
[[ $ARCH == aarch64 ]] ||
    die "this is not a Jetson: 'uname -m' says $ARCH, expected aarch64"

RELEASE_FILE=${NV_TEGRA_RELEASE:-/etc/nv_tegra_release}
[[ -f $RELEASE_FILE ]] ||
    die "this is not a Jetson: $RELEASE_FILE not found (it names the L4T release on JetPack)"
RELEASE_LINE=$(head -n 1 "$RELEASE_FILE")
if [[ $RELEASE_LINE =~ ^#\ R([0-9]+)\ \(release\),\ REVISION:\ ([0-9]+(\.[0-9]+)*) ]]; then
    L4T_MAJOR=${BASH_REMATCH[1]}
    L4T_REVISION=${BASH_REMATCH[2]}
else
    die "unknown L4T release in $RELEASE_FILE: '$RELEASE_LINE' (expected e.g. '# R36 (release), REVISION: 3.0, ...')"
fi
L4T=R$L4T_MAJOR.$L4T_REVISION
case $L4T_MAJOR in
    36) JETPACK=6 ;;
    35) die "L4T $L4T (JetPack 5) is not supported: armdi needs JetPack 6 (L4T R36, Python $EXPECTED_PYTHON)" ;;
    32) die "L4T $L4T (JetPack 4) is not supported: armdi needs JetPack 6 (L4T R36, Python $EXPECTED_PYTHON)" ;;
    *) die "L4T $L4T is not a supported release: armdi supports JetPack 6 (L4T R36) only" ;;
esac

if [[ $DRY_RUN -eq 0 && $ROOT_GIVEN -eq 0 ]]; then
    [[ $(id -u) == 0 ]] ||
        die "must run as root to change the system: use sudo, or --dry-run to only see the plan"
fi

[[ -f $SRC_DIR/pyproject.toml ]] ||
    die "armdi source not found: $SRC_DIR/pyproject.toml is missing (use --src DIR)"
SRC_DIR=$(cd "$SRC_DIR" && pwd)
TEMPLATE_DIR=$SCRIPT_DIR/deploy/systemd
UNIT_NAME=armdi-node.service
[[ $ROLE == source ]] && UNIT_NAME=armdi-serve.service
OTHER_UNIT=armdi-serve.service
[[ $ROLE == source ]] && OTHER_UNIT=armdi-node.service
TEMPLATE=$TEMPLATE_DIR/$UNIT_NAME.in
[[ -f $TEMPLATE ]] || die "unit template $TEMPLATE is missing"

if [[ -z $NODE_NAME ]]; then
    NODE_NAME=$(uname -n)
    NODE_NAME=${NODE_NAME%%.*}
fi
[[ $NODE_NAME =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] ||
    die "node name '$NODE_NAME' must be letters, digits, '.', '_' or '-' (use --name)"

if [[ -n $CONFIG_SRC ]]; then
    [[ -f $CONFIG_SRC ]] || die "--config $CONFIG_SRC: no such file"
elif [[ ! -f $ROOT$CONF_FILE ]]; then
    die "no cluster config: pass --config cluster.toml (it is copied to $CONF_FILE)"
fi

if [[ -n $KEYS_SRC ]]; then
    for f in cluster.key ca.crt "nodes/$NODE_NAME.pem"; do
        [[ -f $KEYS_SRC/$f ]] || die "--keys $KEYS_SRC: no $f (make the keys with: armdi keys init --out DIR --nodes ...,$NODE_NAME)"
    done
fi

if [[ -n $POWER_MODE ]]; then
    command -v nvpmodel >/dev/null ||
        die "--power-mode: nvpmodel not found on PATH (it ships with JetPack's nvidia-l4t-tools)"
fi
if [[ $CLOCKS -eq 1 ]]; then
    JETSON_CLOCKS=$(command -v jetson_clocks) ||
        die "--clocks: jetson_clocks not found on PATH (it ships with JetPack's nvidia-l4t-tools)"
fi

WORK=$(mktemp -d)
IN_STEPS=0

on_exit() {
    local rc=$? item
    rm -rf "$WORK"
    if [[ $rc -ne 0 && $IN_STEPS -eq 1 ]]; then
        printf '\n%s: stopped with an error (exit %d) after %d change(s):\n' "$PROG" "$rc" "${#CHANGES[@]}" >&2
        for item in "${CHANGES[@]}"; do
            printf '  - %s\n' "$item" >&2
        done
        printf 'Fix the error above and rerun: finished steps are skipped.\n' >&2
    fi
}
trap on_exit EXIT

# ---------------------------------------------------------------------------- reporting
DRY=$DRY_RUN
CHANGES=()
UNCHANGED=()

unchanged() {
    UNCHANGED+=("$1")
    printf 'unchanged: %s\n' "$1"
}

changing() {
    CHANGES+=("$1")
    if [[ $DRY -eq 1 ]]; then
        printf 'would change: %s\n' "$1"
    else
        printf 'changed: %s\n' "$1"
    fi
}

# Run a command that changes the system (or print it on a dry run).
act() {
    local shown
    shown=$(printf '%q ' "$@")
    if [[ $DRY -eq 1 ]]; then
        printf '    would run: %s\n' "${shown% }"
    else
        printf '    + %s\n' "${shown% }"
        "$@"
    fi
}

# Write stdin to $1 (mode $2) when its content differs; return 0 when it was (or would be)
# written, 1 when the file already has exactly this content.
file_differs() {
    local dest=$1 new=$WORK/new
    cat >"$new"
    [[ -f $dest ]] && cmp -s "$new" "$dest" && return 1
    return 0
}

install_file() {
    local dest=$1 mode=$2 new=$WORK/new
    act mkdir -p "$(dirname "$dest")"
    if [[ $DRY -eq 1 ]]; then
        printf '    would write: %s\n' "$dest"
    else
        printf '    + write %s\n' "$dest"
        cp "$new" "$dest.armdi-new"
        chmod "$mode" "$dest.armdi-new"
        mv -f "$dest.armdi-new" "$dest"
    fi
}

# ---------------------------------------------------------------------------- steps
# pycuda's build and TensorRT engine builds find CUDA through these (children only).
export CUDA_ROOT=$CUDA_DIR CUDA_HOME=$CUDA_DIR PATH=$CUDA_DIR/bin:$PATH
VENV=$ROOT$VENV_DIR
RESTART_REASONS=()

pkg_installed() {
    [[ $(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null) == installed ]]
}

step_packages() {
    local pkg missing=()
    for pkg in "${APT_PACKAGES[@]}"; do
        pkg_installed "$pkg" || missing+=("$pkg")
    done
    if [[ ${#missing[@]} -eq 0 ]]; then
        unchanged "apt packages installed: ${APT_PACKAGES[*]}"
        return
    fi
    changing "install apt packages: ${missing[*]}"
    act apt-get update
    act env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
}

check_python() {
    local version
    if ! version=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null); then
        [[ $DRY -eq 1 ]] && return 0
        die "python3 does not run; JetPack 6 ships Python $EXPECTED_PYTHON"
    fi
    [[ $version == "$EXPECTED_PYTHON" ]] ||
        die "python3 is $version but JetPack 6's TensorRT bindings (python3-libnvinfer) are built for Python $EXPECTED_PYTHON"
}

step_venv() {
    local cfg=$VENV/pyvenv.cfg
    if [[ -x $VENV/bin/python && -f $cfg ]]; then
        if grep -Eq '^include-system-site-packages *= *true' "$cfg"; then
            unchanged "venv $VENV with system site packages (sees apt's TensorRT)"
        else
            changing "venv $VENV: turn on system site packages"
            act sed -i -E 's/^(include-system-site-packages *= *).*/\1true/' "$cfg"
        fi
        return
    fi
    changing "create venv $VENV with --system-site-packages"
    act mkdir -p "$(dirname "$VENV")"
    act python3 -m venv --system-site-packages "$VENV"
}

source_hash() {
    local names=() n
    for n in pyproject.toml engines builder appliance web; do
        [[ -e $SRC_DIR/$n ]] && names+=("$n")
    done
    (
        cd "$SRC_DIR"
        find "${names[@]}" -type f ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 |
            LC_ALL=C sort -z | xargs -0 sha256sum
    ) | sha256sum | cut -d' ' -f1
}

step_armdi() {
    local stamp=$VENV/.armdi-source.sha256 hash
    hash=$(source_hash)
    if [[ -f $stamp && $(<"$stamp") == "$hash" ]]; then
        unchanged "armdi from $SRC_DIR installed in the venv"
        return
    fi
    changing "install armdi from $SRC_DIR into the venv (TensorRT comes from apt, not the 'trt' extra)"
    act "$VENV/bin/pip" install --upgrade "$SRC_DIR"
    if [[ $DRY -eq 0 ]]; then
        printf '%s\n' "$hash" >"$stamp"
    fi
    RESTART_REASONS+=("armdi reinstalled")
}

step_pycuda() {
    if [[ -x $VENV/bin/pip ]] && "$VENV/bin/pip" show pycuda >/dev/null 2>&1; then
        unchanged "pycuda installed in the venv"
        return
    fi
    changing "build and install pycuda (CUDA_ROOT=CUDA_HOME=$CUDA_DIR, $CUDA_DIR/bin on PATH)"
    if [[ $DRY -eq 0 && ! -f $CUDA_DIR/include/cuda.h ]]; then
        warn "$CUDA_DIR/include/cuda.h not found; the pycuda build needs the CUDA toolkit (nvidia-cuda-dev)"
    fi
    act "$VENV/bin/pip" install "$PYCUDA_REQ"
}

check_tensorrt() {
    [[ $DRY -eq 1 ]] && return 0
    local version
    version=$("$VENV/bin/python" -c 'import tensorrt; print(tensorrt.__version__)' 2>/dev/null) ||
        die "the venv cannot import tensorrt: check that python3-libnvinfer is installed and the venv uses the system python3"
    printf 'check: TensorRT %s importable from the venv\n' "$version"
}

step_power_mode() {
    [[ -n $POWER_MODE ]] || return 0
    local current
    current=$(nvpmodel -q 2>/dev/null | awk '/^[0-9]+$/ {m = $1} END {print m}') || current=
    if [[ $current == "$POWER_MODE" ]]; then
        unchanged "power mode $POWER_MODE"
        return
    fi
    changing "power mode ${current:-unknown} -> $POWER_MODE"
    act nvpmodel -m "$POWER_MODE"
}

unit_running() {
    local state
    state=$(systemctl is-active "$1" 2>/dev/null) || true
    [[ $state == active || $state == activating || $state == reloading ]]
}

unit_enabled() {
    systemctl is-enabled "$1" >/dev/null 2>&1
}

step_clocks() {
    [[ $CLOCKS -eq 1 ]] || return 0
    local dest=$ROOT$UNIT_DIR/$CLOCKS_UNIT reload=0
    if file_differs "$dest" <<EOF; then
# Installed by jetson_setup.sh: lock the Jetson's clocks at their maximum at every boot.
[Unit]
Description=Lock Jetson clocks at maximum (jetson_clocks) for armdi
After=nvpmodel.service

[Service]
Type=oneshot
ExecStart=$JETSON_CLOCKS
RemainAfterExit=yes

[Install]
WantedBy=multi-user.target
EOF
        changing "install $dest (jetson_clocks at boot)"
        install_file "$dest" 0644
        reload=1
    else
        unchanged "$CLOCKS_UNIT installed"
    fi
    if [[ $reload -eq 0 ]] && unit_enabled "$CLOCKS_UNIT" && unit_running "$CLOCKS_UNIT"; then
        unchanged "clocks locked at maximum ($CLOCKS_UNIT enabled and active)"
        return
    fi
    [[ $reload -eq 1 ]] || changing "enable and start $CLOCKS_UNIT"
    act systemctl daemon-reload
    act systemctl enable --now "$CLOCKS_UNIT"
}

step_swap() {
    [[ -n $SWAP_SIZE ]] || return 0
    local file=$ROOT$SWAP_FILE fstab=$ROOT$FSTAB size
    local new=$file.armdi-new
    if [[ -f $file ]]; then
        size=$(stat -c %s "$file")
        if [[ $size == "$SWAP_BYTES" ]]; then
            unchanged "swapfile $file ($SWAP_SIZE)"
        else
            warn "$file exists with $size bytes, not $SWAP_SIZE; leaving it (swapoff and remove it, then rerun, to resize)"
            unchanged "swapfile $file (existing size kept)"
        fi
    else
        changing "create swapfile $file of $SWAP_SIZE"
        act fallocate -l "$SWAP_BYTES" "$new"
        act chmod 600 "$new"
        act mkswap "$new"
        act mv -f "$new" "$file"
    fi
    if [[ -f $fstab ]] && awk -v f="$SWAP_FILE" '$1 == f && $3 == "swap" {found = 1} END {exit !found}' "$fstab"; then
        unchanged "swapfile listed in $fstab"
    else
        changing "add $SWAP_FILE to $fstab"
        if [[ $DRY -eq 1 ]]; then
            printf '    would append to %s: %s none swap sw 0 0\n' "$fstab" "$SWAP_FILE"
        else
            act mkdir -p "$(dirname "$fstab")"
            printf '    + append to %s: %s none swap sw 0 0\n' "$fstab" "$SWAP_FILE"
            printf '%s none swap sw 0 0\n' "$SWAP_FILE" >>"$fstab"
        fi
    fi
    if swapon --show=NAME --noheadings 2>/dev/null | grep -Fqx "$file"; then
        unchanged "swap $file active"
    else
        changing "turn on swap $file"
        act swapon "$file"
    fi
}

step_desktop() {
    [[ $NO_DESKTOP -eq 1 ]] || return 0
    local current
    current=$(systemctl get-default 2>/dev/null) || current=
    if [[ $current == multi-user.target ]]; then
        unchanged "boots to the console (multi-user.target)"
        return
    fi
    changing "boot to the console: default target ${current:-unknown} -> multi-user.target (reboot to apply)"
    act systemctl set-default multi-user.target
}

trt_version() {
    dpkg-query -W -f='${Version}' python3-libnvinfer 2>/dev/null || echo unknown
}

step_model() {
    [[ -n $MODEL_FROM ]] || return 0
    local repo=$ROOT$REPO_DIR stamp=$ROOT$STATE_DIR/model-$MODEL.stamp
    if [[ -f $stamp && $(<"$stamp") == "$PACK_SHA" && -f $repo/$MODEL/manifest.json ]]; then
        unchanged "model $MODEL from $MODEL_FROM installed in $repo"
        return
    fi
    changing "install model $MODEL from $MODEL_FROM into $repo (armdi unpack verifies every file)"
    act "$VENV/bin/armdi" unpack "$MODEL_FROM" --repo "$repo"
    if [[ $DRY -eq 0 ]]; then
        mkdir -p "$(dirname "$stamp")"
        printf '%s\n' "$PACK_SHA" >"$stamp"
    fi
    RESTART_REASONS+=("model installed")
}

step_engines() {
    local repo=$ROOT$REPO_DIR stamp want
    if [[ -d $repo ]]; then
        unchanged "model repository $repo exists"
    else
        changing "create model repository $repo"
        act mkdir -p "$repo"
    fi
    if [[ $SKIP_BUILD -eq 1 ]]; then
        printf 'skipped: engine build for %s (--skip-build)\n' "$MODEL"
        return
    fi
    stamp=$ROOT$STATE_DIR/engines-${MODEL//\//_}.stamp
    want=$(printf 'model=%s\nbackend=trt\nrepo=%s\nl4t=%s\ntensorrt=%s\n' \
        "$MODEL" "$REPO_DIR" "$L4T" "$(trt_version)")
    [[ -z $PACK_SHA ]] || want+=$'\n'"pack=$PACK_SHA"  # a new pack needs new engines
    if [[ -f $stamp && $(<"$stamp") == "$want" ]]; then
        unchanged "TensorRT engines for $MODEL built for $L4T"
        return
    fi
    changing "build TensorRT engines for $MODEL into $repo (minutes per segment)"
    act "$VENV/bin/armdi" build "$MODEL" --backend trt --repo "$repo"
    if [[ $DRY -eq 0 ]]; then
        mkdir -p "$(dirname "$stamp")"
        printf '%s\n' "$want" >"$stamp"
    fi
    RESTART_REASONS+=("engines rebuilt")
}

step_config() {
    local dest=$ROOT$CONF_FILE
    [[ -n $CONFIG_SRC ]] || {
        unchanged "cluster config $dest (kept)"
        return
    }
    if file_differs "$dest" <"$CONFIG_SRC"; then
        changing "copy $CONFIG_SRC to $dest"
        install_file "$dest" 0644
        RESTART_REASONS+=("config changed")
    else
        unchanged "cluster config $dest"
    fi
}

step_keys() {
    [[ -n $KEYS_SRC ]] || return 0
    local dir=$ROOT$KEYS_DIR src dest mode
    if [[ -d $dir && $(stat -c %a "$dir") == 700 ]]; then
        unchanged "keys directory $dir (0700)"
    else
        changing "make $dir (mode 0700)"
        act mkdir -p "$dir"
        act chmod 700 "$dir"
    fi
    for src in cluster.key ca.crt "nodes/$NODE_NAME.pem"; do
        dest=$dir/$(basename "$src")
        mode=0600
        [[ $src == ca.crt ]] && mode=0644
        if file_differs "$dest" <"$KEYS_SRC/$src" || [[ $(stat -c %a "$dest") != "${mode#0}" ]]; then
            changing "install $dest (mode $mode)"
            install_file "$dest" "$mode"
            RESTART_REASONS+=("keys changed")
        else
            unchanged "$dest (mode $mode)"
        fi
    done
}

render_unit() {
    local text
    text=$(<"$TEMPLATE")
    text=${text//@VENV@/"$VENV_DIR"}
    text=${text//@CONFIG@/"$CONF_FILE"}
    text=${text//@NAME@/"$NODE_NAME"}
    text=${text//@REPO@/"$REPO_DIR"}
    text=${text//@DATA_HOME@/"$DATA_HOME"}
    text=${text//@CUDA@/"$CUDA_DIR"}
    printf '%s\n' "$text"
}

step_units() {
    local dest=$ROOT$UNIT_DIR/$UNIT_NAME other=$ROOT$UNIT_DIR/$OTHER_UNIT reload=0
    if [[ -f $other ]]; then
        changing "remove $OTHER_UNIT (this device's role is now $ROLE)"
        act systemctl disable --now "$OTHER_UNIT"
        act rm -f "$other"
        reload=1
    fi
    if render_unit | file_differs "$dest"; then
        changing "install $dest"
        install_file "$dest" 0644
        reload=1
        RESTART_REASONS+=("unit changed")
    else
        unchanged "unit $dest"
    fi
    [[ $reload -eq 1 ]] && act systemctl daemon-reload
    if unit_enabled "$UNIT_NAME" && unit_running "$UNIT_NAME"; then
        if [[ ${#RESTART_REASONS[@]} -gt 0 ]]; then
            changing "restart $UNIT_NAME (${RESTART_REASONS[*]})"
            act systemctl restart "$UNIT_NAME"
        else
            unchanged "$UNIT_NAME enabled and running"
        fi
        return
    fi
    changing "enable and start $UNIT_NAME"
    act systemctl enable --now "$UNIT_NAME"
}

run_steps() {
    CHANGES=()
    UNCHANGED=()
    RESTART_REASONS=()
    IN_STEPS=1
    step_packages
    step_venv
    step_armdi
    step_pycuda
    check_tensorrt
    step_power_mode
    step_clocks
    step_swap
    step_desktop
    step_model
    step_engines
    step_config
    step_keys
    step_units
    IN_STEPS=0
}

summary() {
    local item
    printf '\nSummary (%s, root %s):\n' "$PROG" "${ROOT:-/}"
    if [[ ${#CHANGES[@]} -eq 0 ]]; then
        printf '  nothing changed: all %d checks already in place\n' "${#UNCHANGED[@]}"
        return
    fi
    if [[ $DRY -eq 1 ]]; then
        printf '  dry run: %d change(s) would be made, %d already in place; nothing was changed\n' \
            "${#CHANGES[@]}" "${#UNCHANGED[@]}"
    else
        printf '  %d change(s) made, %d already in place\n' "${#CHANGES[@]}" "${#UNCHANGED[@]}"
    fi
    for item in "${CHANGES[@]}"; do
        printf '  - %s\n' "$item"
    done
}

# ---------------------------------------------------------------------------- main
check_python  # a refusal comes before the first change, never after the apt step
MODE=
[[ $DRY_RUN -eq 1 ]] && MODE='; dry run, nothing will be changed'
printf '%s: L4T %s (JetPack %s), %s; role %s, name %s, model %s; root %s%s\n' \
    "$PROG" "$L4T" "$JETPACK" "$ARCH" "$ROLE" "$NODE_NAME" "$MODEL" "${ROOT:-/}" "$MODE"

if [[ $DRY_RUN -eq 0 && $ASSUME_YES -eq 0 ]]; then
    # Show the plan first, then ask.
    [[ -t 0 ]] || die "not asking on a non-interactive input: pass --yes to proceed (or --dry-run)"
    DRY=1
    run_steps
    if [[ ${#CHANGES[@]} -eq 0 ]]; then
        summary
        exit 0
    fi
    printf '\n'
    read -r -p "Apply these ${#CHANGES[@]} change(s)? [y/N] " answer
    [[ $answer == [yY] || $answer == [yY][eE][sS] ]] || die "aborted; nothing was changed"
    DRY=0
fi

run_steps
summary
