#!/usr/bin/env bash
# Build the offline base image, for machines that reach no container registry.
#
#   images/build_offline_base.sh TAG
#
# A Debian root filesystem made with `debootstrap --variant=minbase` for this host's release, from
# the mirror that apt is configured with, plus python3 and python3-venv; a venv at /opt/venv with
# torch and numpy installed from wheels that this host's pip finds (the torch wheel is the local
# CPU build), then the shared images/install.sh run inside the chroot (the same script the CUDA
# image runs), caches and docs stripped, loaded with `docker import` as TAG.
#
# About two minutes from scratch on 2 cores; the debootstrapped root is cached as a tarball under
# $AUTORESEARCH_CACHE_DIR/base/ (default ~/.cache/autoresearch/base/), keyed by release, mirror and
# package list, so a rebuild skips debootstrap. Needs root (debootstrap, chroot), debootstrap and a
# Docker engine.
#
# Environment:
#   TORCH_SPEC   torch requirement (default torch==2.13.0; never leave it unpinned: an unpinned
#                torch can resolve to a multi-GB CUDA build)
#   NUMPY_SPEC   numpy requirement (default numpy)
#   PYTHON       host interpreter whose pip downloads the wheels (default python3)
#   RELEASE, MIRROR   override the Debian release and mirror read from the host
#   AUTORESEARCH_CACHE_DIR   cache root (default ~/.cache/autoresearch)
set -euo pipefail

TAG="${1:?usage: build_offline_base.sh TAG}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
NUMPY_SPEC="${NUMPY_SPEC:-numpy}"
PYTHON="${PYTHON:-python3}"
CACHE="${AUTORESEARCH_CACHE_DIR:-$HOME/.cache/autoresearch}/base"
PACKAGES="python3,python3-venv"

if [ "$(id -u)" != 0 ]; then
    echo "build_offline_base.sh: debootstrap and chroot need root; re-running with sudo" >&2
    exec sudo --preserve-env=TORCH_SPEC,NUMPY_SPEC,PYTHON,RELEASE,MIRROR \
        AUTORESEARCH_CACHE_DIR="${CACHE%/base}" "$0" "$@"
fi
for cmd in debootstrap docker tar chroot "$PYTHON"; do
    command -v "$cmd" >/dev/null || { echo "build_offline_base.sh: '$cmd' not found" >&2; exit 1; }
done

T0=$SECONDS
phase_start=$SECONDS
phase() {  # phase NAME: print the time the previous phase took, then start NAME
    local now=$SECONDS
    [ -z "${PHASE:-}" ] || printf '[base] %-10s %4ss\n' "$PHASE" "$((now - phase_start))"
    PHASE="$1"; phase_start=$now
    [ -z "$PHASE" ] || echo "[base] $PHASE ..."
}

# The release and the first mirror apt is configured with for it: deb822 *.sources stanzas and
# one-line *.list entries (deb [options] URI SUITE COMPONENTS...).
release() {
    [ -n "${RELEASE:-}" ] && { echo "$RELEASE"; return; }
    # shellcheck disable=SC1091  # the host's file, read at run time
    . /etc/os-release && echo "${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release: set RELEASE}"
}
mirror() {
    [ -n "${MIRROR:-}" ] && { echo "$MIRROR"; return; }
    local files=() f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] && files+=("$f")
    done
    [ ${#files[@]} -gt 0 ] || return 0
    awk -v rel="$1" '
        function flush() {
            if (!found && types ~ /(^| )deb( |$)/ && (" " suites " ") ~ (" " rel " ") &&
                enabled != "no" && uris != "") {
                split(uris, u, " "); print u[1]; found = 1; exit
            }
            types = uris = suites = enabled = ""
        }
        FILENAME != last { flush(); last = FILENAME }
        FILENAME ~ /\.sources$/ {
            if ($0 ~ /^[ \t]*$/) { flush(); next }
            if ($0 ~ /^#/) next
            key = tolower($1); sub(/^[^:]*:[ \t]*/, "")
            if (key == "types:") types = $0; else if (key == "uris:") uris = $0
            else if (key == "suites:") suites = $0; else if (key == "enabled:") enabled = tolower($0)
            next
        }
        $1 == "deb" {
            i = 2
            if ($i ~ /^\[/) { while ($i !~ /\]$/ && i < NF) i++; i++ }
            if ($(i + 1) == rel) { print $i; found = 1; exit }
        }
        END { flush() }' "${files[@]}"
}

RELEASE="$(release)"
MIRROR="$(mirror "$RELEASE")"
[ -n "$MIRROR" ] || { echo "build_offline_base.sh: no apt source for '$RELEASE' found: set MIRROR" >&2; exit 1; }
ARCH="$(dpkg --print-architecture)"
KEY="$(printf '%s\n' "$RELEASE" "$MIRROR" "$ARCH" minbase "$PACKAGES" | sha256sum | cut -c1-12)"
ROOTFS_TAR="$CACHE/rootfs-$RELEASE-$ARCH-$KEY.tar"
echo "[base] $TAG: Debian $RELEASE/$ARCH from $MIRROR, $TORCH_SPEC"

WORK="$(mktemp -d "${TMPDIR:-/var/tmp}/autoresearch-base.XXXXXX")"
ROOT="$WORK/rootfs"
cleanup() {  # unmount whatever a failed debootstrap left mounted in the root, then delete it
    awk -v r="$ROOT/" 'index($2, r) == 1 { print $2 }' /proc/mounts | sort -r |
        while read -r m; do umount -l "$m" || true; done
    rm -rf --one-file-system "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Docs, man pages and translations are never installed (dpkg path-exclude, as Debian's own
# container images do); apt lists and downloaded .debs are removed once the root is made.
strip_root() {
    rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/* "$ROOT"/var/cache/debconf/*-old \
        "$ROOT"/var/log/*.log "$ROOT"/var/log/apt/* "$ROOT"/root/.cache "$ROOT"/tmp/* \
        "$ROOT"/usr/share/doc/* "$ROOT"/usr/share/man/* "$ROOT"/usr/share/info/* \
        "$ROOT"/usr/share/locale/* "$ROOT"/usr/share/lintian
    # debootstrap copies these from the host; Docker provides its own at run time.
    : >"$ROOT/etc/resolv.conf"; : >"$ROOT/etc/hostname"
}

if [ -f "$ROOTFS_TAR" ]; then
    echo "[base] cached root: $ROOTFS_TAR"
    phase "unpack cached root"
    mkdir -p "$ROOT"
    tar --numeric-owner -C "$ROOT" -xpf "$ROOTFS_TAR"
else
    # --foreign, then the second stage inside the chroot: that lets dpkg run with unsafe-io (no
    # fsync per file: the root is thrown away if the build fails) and skip docs from the start.
    phase "debootstrap"
    debootstrap --variant=minbase --foreign --arch="$ARCH" --include="$PACKAGES" \
        "$RELEASE" "$ROOT" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 ||
        { tail -n 30 "$WORK/debootstrap.log" >&2; exit 1; }
    cat >"$ROOT/etc/dpkg/dpkg.cfg.d/01-autoresearch" <<'EOF'
force-unsafe-io
path-exclude=/usr/share/doc/*
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-exclude=/usr/share/lintian/*
EOF
    chroot "$ROOT" /debootstrap/debootstrap --second-stage >>"$WORK/debootstrap.log" 2>&1 ||
        { tail -n 30 "$WORK/debootstrap.log" >&2; exit 1; }
    sed -i '/^force-unsafe-io$/d' "$ROOT/etc/dpkg/dpkg.cfg.d/01-autoresearch"
    strip_root
    phase "cache root"
    mkdir -p "$CACHE"
    rm -f "$CACHE"/rootfs-"$RELEASE"-"$ARCH"-*.tar  # an older key for this release: superseded
    tar --numeric-owner -C "$ROOT" -cf "$ROOTFS_TAR.tmp.$$" . && mv "$ROOTFS_TAR.tmp.$$" "$ROOTFS_TAR"
fi

# Wheels for the chroot's own Python (which may differ from the host's), from this host's pip:
# its configured indexes and find-links, where the torch wheel lies.
phase "download wheels"
PYVER="$(chroot "$ROOT" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
mkdir -p "$ROOT/tmp/wheels"
"$PYTHON" -m pip download --quiet --disable-pip-version-check --only-binary=:all: \
    --python-version "$PYVER" -d "$ROOT/tmp/wheels" "$TORCH_SPEC" "$NUMPY_SPEC" 2>&1 |
    { grep -v "is ignored: it is neither a file nor a directory" || true; } >&2

phase "venv + install.sh"
cp "$HERE/install.sh" "$ROOT/tmp/install.sh"
# shellcheck disable=SC2016  # expanded by the chroot's shell, from its arguments
chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 /bin/sh -euc '
    python3 -m venv /opt/venv
    TORCH_SPEC="$1" NUMPY_SPEC="$2" PIP_INSTALL_ARGS="--no-index --find-links /tmp/wheels" \
        sh /tmp/install.sh /opt/venv/bin/python' sh "$TORCH_SPEC" "$NUMPY_SPEC"
# Compiled bytecode (__pycache__) stays: the root filesystem is read-only at run time, so without
# it every container would recompile torch in memory (about 1.5 s more per start).
strip_root

phase "docker import"
tar --numeric-owner -C "$ROOT" --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' -c . |
    docker import \
        --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1' \
        --change 'WORKDIR /app' \
        --change 'CMD ["python3"]' \
        --change "LABEL autoresearch.base.kind=offline autoresearch.base.release=$RELEASE autoresearch.base.torch=\"$TORCH_SPEC\"" \
        --message "autoresearch offline base: Debian $RELEASE, $TORCH_SPEC" \
        - "$TAG" >/dev/null
phase ""
echo "[base] $TAG built in $((SECONDS - T0))s"
