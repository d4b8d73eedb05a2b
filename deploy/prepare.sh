#!/usr/bin/env bash
# Prepare the images' build context in deploy/.build/ctx (and the base image).
#
#   deploy/prepare.sh          -> prints the variables compose needs (KEY=VALUE lines)
#
# * Base image: EGRESSD_BASE_IMAGE if set (e.g. python:3.11-slim-bookworm on a
#   machine that can pull), else a local Debian bookworm image made with
#   debootstrap + docker import (deploy/base-image.sh), cached in docker's image
#   store under a content-keyed tag.
# * Wheelhouse: every Python dependency of egressd (and locust, for the `load`
#   profile) as wheels, made on the host with pip (image builds may not reach
#   an index). Cached in ~/.cache/egressd/wheels-<key>, key = SHA-256 of
#   pyproject.toml's dependency lists and the host's Python tag.
# * Sources: egressd/, bpf/, sandbox/udfs/, pyproject.toml, loadtests/.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
CTX=$HERE/.build/ctx
CACHE=${EGRESSD_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/egressd}

if [ -n "${EGRESSD_BASE_IMAGE:-}" ]; then
    BASE=$EGRESSD_BASE_IMAGE
else
    BASE=$("$HERE/base-image.sh")
fi

# --- wheelhouse --------------------------------------------------------------
reqs() {  # reqs deps|load: a requirement list of pyproject.toml
    "$PYTHON" - "$ROOT/pyproject.toml" "$1" <<'PY'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
reqs = project["dependencies"] if sys.argv[2] == "deps" else project["optional-dependencies"]["load"]
print("\n".join(sorted(set(reqs))))
PY
}
DEPS=$(reqs deps)
LOAD=$(reqs load)
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

# --- build context -------------------------------------------------------------
rm -rf "$CTX"; mkdir -p "$CTX/app/sandbox"
cp -al "$WHEELS" "$CTX/wheels" 2>/dev/null || cp -a "$WHEELS" "$CTX/wheels"
rm -f "$CTX/wheels/requirements.txt" "$CTX/wheels/.complete"  # hard links: never write through them
printf '%s\n' "$DEPS" > "$CTX/wheels/requirements.txt"
printf '%s\n' "$LOAD" > "$CTX/wheels/requirements-load.txt"
tar -C "$ROOT" --exclude=__pycache__ --exclude='*.pyc' --exclude='*.o' -c egressd bpf pyproject.toml \
    | tar -C "$CTX/app" -x
cp -a "$ROOT/sandbox/udfs" "$CTX/app/sandbox/udfs"
mkdir -p "$CTX/loadtests"
cp -a "$ROOT/loadtests/." "$CTX/loadtests/" 2>/dev/null || true
cp -a "$HERE/docker" "$CTX/docker"
# Content key of the sources: compose tags the images with it (EGRESSD_TAG).
TAG=$( (cd "$CTX" && find app docker loadtests -type f -print0 | sort -z | xargs -0 sha256sum;
        cd "$ROOT" && sha256sum deploy/Dockerfile node-agent/Dockerfile sandbox/Dockerfile deploy/compose.yaml;
        echo "$BASE $KEY") | sha256sum | cut -c1-12)
echo "EGRESSD_BASE_IMAGE=$BASE"
echo "EGRESSD_TAG=$TAG"
