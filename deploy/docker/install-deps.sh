#!/bin/sh
# Install one of pyproject.toml's requirement lists during an image build.
#
#   install-deps.sh VENV deps|load|sandbox [pip install options...]
#
# From /wheels when it holds wheels (the offline route: a wheelhouse made on
# the host by deploy/prepare.sh, build argument WHEELHOUSE), else from the
# package index (the default: `docker compose up --build` on any Docker host).
# Installs Debian's python3 first when the base image has none (debian:bookworm-slim).
set -eu
venv=$1
which=$2
shift 2
here=$(dirname "$0")
if ls /wheels/*.whl >/dev/null 2>&1; then offline=1; else offline=0; fi

pkgs=""
command -v python3 >/dev/null || pkgs="python3"
[ "$offline" = 1 ] || python3 -c 'import ensurepip' 2>/dev/null || pkgs="$pkgs python3-venv"
if [ -n "$pkgs" ]; then
    apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
    rm -rf /var/lib/apt/lists/*
fi

python3 "$here/requirements.py" "$here/../../pyproject.toml" "$which" > /tmp/requirements-$which.txt
if [ "$offline" = 1 ]; then
    [ -x "$venv/bin/python" ] || python3 -m venv --without-pip "$venv"
    pip_wheel=$(ls /wheels/pip-*.whl | head -1)
    "$venv/bin/python" "$pip_wheel/pip" install -q --no-index --find-links /wheels \
        -r "/tmp/requirements-$which.txt" "$@"
else
    [ -x "$venv/bin/pip" ] || python3 -m venv "$venv"
    "$venv/bin/pip" install -q --no-cache-dir -r "/tmp/requirements-$which.txt" "$@"
fi
rm -f "/tmp/requirements-$which.txt"
