#!/usr/bin/env bash
# Build the images (cached by content key), bring the fleet up, wait until every
# container is healthy. Extra arguments go to `up` (e.g. --scale proxy=3).
#
#   deploy/up.sh [--scale proxy=3]
#   EGRESSD_PROFILES=load deploy/up.sh        # also the locust load generator
#   EGRESSD_PROJECT=name deploy/up.sh         # compose project name (default egressd)
#   EGRESSD_PROFILES=monitoring deploy/up.sh  # also Prometheus, scraping every member
#   EGRESSD_BASE_IMAGE=debian:bookworm-slim deploy/up.sh   # a pullable base instead of debootstrap
#
# This is the offline route (a local base image, a wheelhouse made on the host:
# deploy/prepare.sh). On a Docker host that can pull and reach the package index,
# `docker compose -f deploy/compose.yaml up --build` needs none of it.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
TIMEOUT=${EGRESSD_UP_TIMEOUT:-300}

ensure_dockerd
eval "$("$DEPLOY_DIR/prepare.sh" | sed 's/^/export /')"
echo "images: egressd*:$EGRESSD_TAG on $EGRESSD_BASE_IMAGE" >&2
if [ "${EGRESSD_WRITE_ENV:-1}" = 1 ]; then
    # deploy/.env: plain `docker-compose -f deploy/compose.yaml ...` (logs, exec, up
    # --scale) then names the same project and images as this script.
    printf 'COMPOSE_PROJECT_NAME=%s\nEGRESSD_BASE_IMAGE=%s\nEGRESSD_WHEELHOUSE=%s\nEGRESSD_TAG=%s\n' \
        "$PROJECT" "$EGRESSD_BASE_IMAGE" "$EGRESSD_WHEELHOUSE" "$EGRESSD_TAG" > "$DEPLOY_DIR/.env"
fi

images=(egressd-sandbox egressd egressd-node)
[[ " ${EGRESSD_PROFILES:-} " == *" load "* ]] && images+=(egressd-loadgen)
[[ " ${EGRESSD_PROFILES:-} " == *" monitoring "* ]] && images+=(egressd-prometheus)
missing=0
for image in "${images[@]}"; do
    docker image inspect "$image:$EGRESSD_TAG" >/dev/null 2>&1 || missing=1
done
if [ "$missing" = 1 ]; then
    # The sandbox image is a stage of the node image's Dockerfile: built here for its tag.
    "${COMPOSE[@]}" -p "$PROJECT" -f "$DEPLOY_DIR/compose.yaml" --profile images build --force-rm sandbox
    compose build --force-rm
    # The tags this script built before (deploy/.built-tags) are superseded (the tag
    # is a content key): remove those and only those; any other tag of an egressd
    # image is someone else's. An image that a running fleet still uses is kept
    # (rmi refuses it) and stays listed for the next build.
    built="$DEPLOY_DIR/.built-tags"
    keep=("$EGRESSD_TAG")
    if [ -f "$built" ]; then
        while read -r tag; do
            [ -n "$tag" ] && [ "$tag" != "$EGRESSD_TAG" ] || continue
            for image in egressd egressd-sandbox egressd-node egressd-loadgen egressd-prometheus; do
                docker image inspect "$image:$tag" >/dev/null 2>&1 || continue
                docker rmi "$image:$tag" >/dev/null 2>&1 || { keep+=("$tag"); break; }
            done
        done < "$built"
    fi
    printf '%s\n' "${keep[@]}" | sort -u > "$built"
else
    echo "images up to date (tag $EGRESSD_TAG)" >&2
fi

compose up -d "$@"

deadline=$((SECONDS + TIMEOUT))
while :; do
    ids=$(compose ps -q)
    pending=()
    for id in $ids; do
        state=$(docker inspect -f '{{.Name}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "$id")
        read -r name status health <<<"$state"
        if [ "$status" != running ]; then
            echo "up.sh: ${name#/} is $status" >&2
            docker logs --tail 30 "$id" >&2 || true
            exit 1
        fi
        [ "$health" = healthy ] || pending+=("${name#/}:$health")
    done
    if [ -n "$ids" ] && [ ${#pending[@]} -eq 0 ]; then
        echo "up.sh: every container healthy" >&2
        compose ps
        exit 0
    fi
    if [ $SECONDS -ge $deadline ]; then
        echo "up.sh: not healthy after ${TIMEOUT}s: ${pending[*]}" >&2
        exit 1
    fi
    sleep 2
done
