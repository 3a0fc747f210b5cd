#!/bin/sh
# The one install step of both base images, so they cannot drift:
#   images/base.Dockerfile         (production: FROM an official CUDA PyTorch image)
#   images/build_offline_base.sh   (offline: a debootstrap Debian root, run inside its chroot)
#
# Usage: install.sh [PYTHON]        PYTHON: the interpreter or venv python to install into
#                                   (default: $PYTHON, else python3)
# Environment:
#   TORCH_SPEC        pip requirement for torch (default torch==2.13.0). "keep": use the torch
#                     that PYTHON already has, unchanged (the CUDA image), and fail if it has none.
#   NUMPY_SPEC        pip requirement for numpy (default numpy; an installed numpy satisfies it).
#   PIP_INSTALL_ARGS  extra pip arguments, e.g. "--no-index --find-links /tmp/wheels" (offline).
#   INSTALL_CC        1: also apt-get a C compiler. Triton (torch.compile on GPU) compiles a small
#                     launcher at run time, and the CUDA *runtime* images ship without gcc.
#
# What the containers get: torch and numpy (all that train.py and `prepare.py score` import), the
# unprivileged user `trainer` (uid/gid 10001, no login shell, HOME=/tmp: the run-time tmpfs), and
# the folders /app (root-owned: code, read-only for the user), /data (mount point, read-only
# mounts) and /out (the one writable mount).
set -eu

PYTHON="${1:-${PYTHON:-python3}}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
NUMPY_SPEC="${NUMPY_SPEC:-numpy}"
PIP_INSTALL_ARGS="${PIP_INSTALL_ARGS:-}"
UID_GID=10001

if [ "${INSTALL_CC:-0}" = 1 ]; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends gcc libc6-dev
    rm -rf /var/lib/apt/lists/*
fi

if [ "$TORCH_SPEC" = keep ]; then
    "$PYTHON" -c 'import torch' || { echo "install.sh: TORCH_SPEC=keep but $PYTHON has no torch" >&2; exit 1; }
    TORCH_SPEC=""
fi
# shellcheck disable=SC2086  # PIP_INSTALL_ARGS and an empty TORCH_SPEC split on purpose
PIP_DISABLE_PIP_VERSION_CHECK=1 "$PYTHON" -m pip install --no-cache-dir $PIP_INSTALL_ARGS \
    $TORCH_SPEC "$NUMPY_SPEC"
"$PYTHON" -c 'import numpy, torch; print("install.sh: torch", torch.__version__, "numpy", numpy.__version__)'

getent group "$UID_GID" >/dev/null || groupadd --gid "$UID_GID" trainer
getent passwd "$UID_GID" >/dev/null ||
    useradd --uid "$UID_GID" --gid "$UID_GID" --no-create-home --home-dir /tmp \
        --shell /usr/sbin/nologin trainer

install -d -o root -g root -m 0755 /app /data
install -d -o "$UID_GID" -g "$UID_GID" -m 0755 /out
