#!/usr/bin/env bash
# Build a local Debian bookworm base image with debootstrap + `docker import`,
# for machines that cannot pull from a registry. Prints the image name.
#
#   deploy/base-image.sh            # build unless an image with this content key exists
#   BASE_MIRROR=http://... deploy/base-image.sh
#
# The tag is a content key: the SHA-256 of this recipe (suite, variant, packages).
# Docker's image store is the cache: a second run with the same recipe is a no-op.
set -euo pipefail

SUITE=bookworm
VARIANT=minbase
INCLUDE=python3,ca-certificates
MIRROR=${BASE_MIRROR:-http://deb.debian.org/debian}
KEY=$(printf '%s\n' "$SUITE" "$VARIANT" "$INCLUDE" "$MIRROR" "v1" | sha256sum | cut -c1-12)
IMAGE=egressd-base:${SUITE}-${KEY}

if docker image inspect "$IMAGE" >/dev/null 2>&1; then
    echo "$IMAGE"
    exit 0
fi
command -v debootstrap >/dev/null || { echo "base-image.sh: debootstrap missing (apt-get install debootstrap)" >&2; exit 1; }

ROOT=$(mktemp -d /var/tmp/egressd-base.XXXXXX)
trap 'rm -rf --one-file-system "$ROOT"' EXIT
echo "base-image.sh: debootstrap $SUITE ($VARIANT, +$INCLUDE) from $MIRROR" >&2
debootstrap --variant="$VARIANT" --include="$INCLUDE" "$SUITE" "$ROOT" "$MIRROR" >&2
# Smaller image, nothing host-specific: apt lists and caches, logs.
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/*.bin "$ROOT"/var/cache/apt/archives/*.deb \
       "$ROOT"/var/log/* "$ROOT"/tmp/*
tar -C "$ROOT" --numeric-owner -c . | docker import \
    -c 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    -c 'CMD ["/bin/bash"]' - "$IMAGE" >&2
echo "$IMAGE"
