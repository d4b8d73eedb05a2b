#!/usr/bin/env bash
# The offline route's preparation (deploy/up.sh): a local base image and a
# wheelhouse, for machines whose image builds cannot pull or reach the package
# index. `docker compose up --build` on an ordinary Docker host needs none of it.
#
#   deploy/prepare.sh          -> prints the variables compose needs (KEY=VALUE lines):
#                                 EGRESSD_BASE_IMAGE, EGRESSD_WHEELHOUSE, EGRESSD_TAG
#
# * Base image: EGRESSD_BASE_IMAGE if set (e.g. debian:bookworm-slim on a
#   machine that can pull), else a local Debian bookworm image made with
#   debootstrap + docker import (deploy/base-image.sh), cached in docker's image
#   store under a content-keyed tag.
# * Wheelhouse: every Python dependency of egressd (and locust, for the `load`
#   profile) as wheels, made on the host with pip (image builds may not reach
#   an index). Cached in ~/.cache/egressd/wheels-<key>, key = SHA-256 of
#   pyproject.toml's dependency lists and the host's Python tag; linked into
#   deploy/.build/wheels, inside the build context (the repository root).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
BUILD=$HERE/.build
CACHE=${EGRESSD_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/egressd}

if [ -n "${EGRESSD_BASE_IMAGE:-}" ]; then
    BASE=$EGRESSD_BASE_IMAGE
else
    BASE=$("$HERE/base-image.sh")
fi

# --- wheelhouse --------------------------------------------------------------
DEPS=$("$PYTHON" "$HERE/docker/requirements.py" "$ROOT/pyproject.toml" deps)
LOAD=$("$PYTHON" "$HERE/docker/requirements.py" "$ROOT/pyproject.toml" load)
REQS=$(printf '%s\n%s\n' "$DEPS" "$LOAD")
PYTAG=$("$PYTHON" -c 'import sys, platform; print(f"cp{sys.version_info[0]}{sys.version_info[1]}-{platform.machine()}")')
KEY=$(printf '%s\n%s\nv1\n' "$REQS" "$PYTAG" | sha256sum | cut -c1-16)
WHEELS=$CACHE/wheels-$KEY
if [ ! -f "$WHEELS/.complete" ]; then
    echo "prepare.sh: building the wheelhouse $WHEELS" >&2
    rm -rf "$WHEELS.tmp"; mkdir -p "$WHEELS.tmp"
    printf '%s\n' "$REQS" > "$WHEELS.tmp/requirements.txt"
    "$PYTHON" -m pip wheel -q --wheel-dir "$WHEELS.tmp" -r "$WHEELS.tmp/requirements.txt" pip >&2
    touch "$WHEELS.tmp/.complete"
    rm -rf "$WHEELS"; mv "$WHEELS.tmp" "$WHEELS"
fi

# --- the wheelhouse in the build context -------------------------------------------
# The build context is the repository root; the images copy deploy/.build/wheels
# when the build argument WHEELHOUSE names it (compose: EGRESSD_WHEELHOUSE).
rm -rf "$BUILD/wheels"; mkdir -p "$BUILD"
cp -al "$WHEELS" "$BUILD/wheels" 2>/dev/null || cp -a "$WHEELS" "$BUILD/wheels"
rm -f "$BUILD/wheels/requirements.txt" "$BUILD/wheels/.complete"  # hard links: never write through them
# Content key of what the images are built from: compose tags them with it (EGRESSD_TAG).
TAG=$( (cd "$ROOT" && find egressd egressd_harness bpf sandbox/udfs loadtests deploy/docker deploy/prometheus \
            -type f ! -name '*.pyc' ! -name '*.o' ! -path '*/__pycache__/*' -print0 2>/dev/null \
            | sort -z | xargs -0 sha256sum;
        cd "$ROOT" && sha256sum pyproject.toml .dockerignore deploy/Dockerfile \
            deploy/compose.yaml;
        echo "$BASE $KEY") | sha256sum | cut -c1-12)
echo "EGRESSD_BASE_IMAGE=$BASE"
echo "EGRESSD_WHEELHOUSE=deploy/.build/wheels"
echo "EGRESSD_TAG=$TAG"
