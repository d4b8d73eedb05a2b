# Shared by up.sh, down.sh and the compose test: which compose, which project.
# shellcheck shell=bash
DEPLOY_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PROJECT=${EGRESSD_PROJECT:-egressd}
if [ -n "${EGRESSD_COMPOSE:-}" ]; then
    read -r -a COMPOSE <<<"$EGRESSD_COMPOSE"
elif command -v docker-compose >/dev/null; then
    COMPOSE=(docker-compose)
else
    COMPOSE=(docker compose)
fi
PROFILE_ARGS=()
for p in ${EGRESSD_PROFILES:-}; do PROFILE_ARGS+=(--profile "$p"); done
compose() { "${COMPOSE[@]}" -p "$PROJECT" -f "$DEPLOY_DIR/compose.yaml" "${PROFILE_ARGS[@]}" "$@"; }

ensure_dockerd() {
    docker info >/dev/null 2>&1 && return 0
    command -v dockerd >/dev/null || { echo "dockerd missing (apt-get install docker.io)" >&2; return 1; }
    echo "starting dockerd (log: /var/log/dockerd.log)" >&2
    (setsid dockerd >/var/log/dockerd.log 2>&1 &)
    for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && return 0; sleep 0.5; done
    echo "dockerd did not start; see /var/log/dockerd.log" >&2
    return 1
}
