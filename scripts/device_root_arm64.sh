#!/usr/bin/env bash
# An aarch64 (Raspberry Pi 4/5, 64-bit) Debian 12 root with Python 3.11, a CPU-only aarch64 torch
# and autorank's device runner, run on this x86_64 machine through qemu-user, without touching the
# kernel: no binfmt handler is registered, nothing under /proc/sys is written. The aarch64
# interpreter is started explicitly:
#
#   scripts/device_root_arm64.sh [ROOT]          # default ROOT: .cache/autorank/arm64-root
#   qemu-aarch64-static -L ROOT ROOT/usr/bin/python3.11 -m autorank.device PLAN CHECKPOINT DATA
#   QEMU_CPU=cortex-a72 qemu-aarch64-static ...   # a Pi 4's instruction set (cortex-a76: Pi 5);
#                                                  # qemu's default "max" has every extension
#   autorank-bench proc-peak --json peak.json -- qemu-aarch64-static -L ROOT ROOT/usr/bin/python3.11 ...
#
# Idempotent and cached: a complete root (stamp file ROOT/.autorank-root-stamp matching this
# script's settings) returns in about a second. Downloads come from Debian's archive (debootstrap,
# apt) and PyPI (host pip, aarch64 wheels), at set-up time only.
#
# torch: 2.9.1, the newest PyPI release whose aarch64 wheel is a CPU build that runs on a Pi 4.
# From 2.11 on the aarch64 wheels on PyPI are CUDA builds (METADATA Requires-Dist: cuda-toolkit,
# nvidia-cudnn-cu13, ... ; platform_system == "Linux", several GB); up to 2.10.0 every nvidia-*
# requirement is marked `platform_machine == "x86_64"`. 2.10.0's aarch64 wheel, though, executes
# ARMv8.1 LSE atomics (ldaddal) while loading torch._C: SIGILL on a Pi 4's Cortex-A72 (ARMv8.0;
# pytorch/pytorch#176993), reproduced here with QEMU_CPU=cortex-a72; it runs on cortex-a76 (Pi 5).
# Override with AUTORANK_ARM64_TORCH=VERSION, e.g. 2.10.0 with AUTORANK_ARM64_CPU=cortex-a76.
# The set-up check runs under AUTORANK_ARM64_CPU (default cortex-a72, a Pi 4's instruction set).
#
# autorank itself is not copied: a .pth file in the root's site-packages names this working tree
# (qemu-user looks a path up under ROOT first and falls back to the host's), so the runner always
# runs the current source. Its core imports only torch and yaml.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ROOT="${1:-$REPO/.cache/autorank/arm64-root}"
mkdir -p "$(dirname "$ROOT")"
ROOT="$(cd "$(dirname "$ROOT")" && pwd)/$(basename "$ROOT")"

TORCH_VERSION="${AUTORANK_ARM64_TORCH:-2.9.1}"
CPU="${AUTORANK_ARM64_CPU:-cortex-a72}"
SUITE=bookworm
# Debian packages beyond minbase: the interpreter and its full standard library (ctypes,
# multiprocessing, sqlite3, ...), and the C/C++ runtime torch's shared objects link against.
DEBS="python3.11-minimal,libpython3.11-stdlib,python3.11,libgomp1,libstdc++6,zlib1g"
# PyPI, installed with --no-deps: torch and what `import torch` needs, then pyyaml for autorank.
PYPKGS="torch==$TORCH_VERSION filelock typing_extensions sympy mpmath networkx jinja2 markupsafe fsspec pyyaml"
SITE="$ROOT/usr/local/lib/python3.11/dist-packages"
STAMP="$ROOT/.autorank-root-stamp"
STAMP_TEXT="suite=$SUITE debs=$DEBS pypkgs=$PYPKGS cpu=$CPU"
QEMU=qemu-aarch64-static
PY=(env -u PYTHONPATH -u PYTHONHOME "$QEMU" -L "$ROOT" "$ROOT/usr/bin/python3.11")

log() { echo "[device-root-arm64] $*" >&2; }

write_pth() {  # cheap, so every run: follows the working tree if the repository moves
    echo "$REPO" >"$SITE/autorank-worktree.pth"
}
# torchvision for its models (mobilenet_v2, resnet18): the release built against torch 2.9.1,
# a CPU build on aarch64, and numpy and Pillow, which it imports; added to an existing root without
# rebuilding it
TORCHVISION_VERSION=0.24.1
ensure_torchvision() {
    [[ -f "$SITE/torchvision/version.py" && -d "$SITE/numpy" && -d "$SITE/PIL" ]] && return 0
    log "pip: torchvision==$TORCHVISION_VERSION"
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --disable-pip-version-check --no-deps --target "$SITE" \
        --platform manylinux_2_28_aarch64 --implementation cp --python-version 3.11 --abi cp311 --only-binary=:all: \
        "torchvision==$TORCHVISION_VERSION" "numpy<2.4" pillow 2> >(grep -v "^WARNING: Location '.*' is ignored" >&2)
}

if [[ -f "$STAMP" && "$(head -n1 "$STAMP")" == "$STAMP_TEXT" ]]; then
    write_pth
    ensure_torchvision
    log "root complete ($STAMP)"
    # the version without starting torch (an emulated `import torch` takes ~10 s)
    echo "torch $(sed -n "s/^__version__ = '\(.*\)'.*/\1/p" "$SITE/torch/version.py")"
    exit 0
fi

# --- host tools (Debian's archive) ---------------------------------------------------------
if ! command -v "$QEMU" >/dev/null || ! command -v debootstrap >/dev/null; then
    log "installing qemu-user-static and debootstrap"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static debootstrap >/dev/null
fi

# --- the Debian root ---------------------------------------------------------------------------
if [[ ! -f "$ROOT/.autorank-debs-stamp" || "$(cat "$ROOT/.autorank-debs-stamp")" != "$SUITE $DEBS" ]]; then
    MIRROR="${DEBIAN_MIRROR:-$(grep -rhoE 'https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/*.sources \
        /etc/apt/sources.list.d/*.list 2>/dev/null | head -n1 | tr -d ' ' || true)}"
    MIRROR="${MIRROR:-http://deb.debian.org/debian}"
    log "debootstrap --foreign arm64 $SUITE from $MIRROR into $ROOT"
    rm -rf "$ROOT"
    mkdir -p "$ROOT"
    # --foreign: download and unpack only; the second stage (maintainer scripts) would need the
    # aarch64 binaries to run through binfmt, which this script never registers.
    debootstrap --foreign --arch=arm64 --variant=minbase --include="$DEBS" "$SUITE" "$ROOT" "$MIRROR" >"$ROOT.debootstrap.log" 2>&1 \
        || { tail -n 20 "$ROOT.debootstrap.log" >&2; exit 1; }
    log "extracting $(ls "$ROOT"/var/cache/apt/archives/*.deb | wc -l) packages"
    for deb in "$ROOT"/var/cache/apt/archives/*.deb; do
        dpkg-deb -x "$deb" "$ROOT"
    done
    echo "$SUITE $DEBS" >"$ROOT/.autorank-debs-stamp"
fi

# --- Python packages (PyPI, aarch64 wheels, installed by the host's pip) ---------------------
log "pip: $PYPKGS"
rm -rf "$SITE"
mkdir -p "$SITE"
# shellcheck disable=SC2086
PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --disable-pip-version-check --no-deps --target "$SITE" \
    --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 \
    --implementation cp --python-version 3.11 --abi cp311 --only-binary=:all: $PYPKGS 2> >(grep -v "^WARNING: Location '.*' is ignored" >&2)
rm -rf "$SITE/bin"  # console scripts written for the host's interpreter
write_pth
ensure_torchvision

# --- check (on the chosen CPU model: an instruction it lacks is a SIGILL here), then stamp ---
QEMU_CPU="$CPU" "${PY[@]}" - <<'EOF'
import platform, torch, yaml
import autorank.device  # the torch-only runner
assert platform.machine() == "aarch64", platform.machine()
assert torch.version.cuda is None and not torch.cuda.is_available(), "not a CPU-only build"
x = torch.randn(2, 3, requires_grad=True)
(x @ x.T).sum().backward()
from autorank.models import mcunet_like
m = mcunet_like(num_classes=10)
m(torch.randn(2, 3, 64, 64)).sum().backward()
print("torch", torch.__version__, "on", platform.machine(), "python", platform.python_version())
EOF
echo "$STAMP_TEXT" >"$STAMP"
for d in "$ROOT" "$SITE" "$SITE/torch"; do du -sh "$d"; done | sed 's/^/[device-root-arm64] size /' >&2
