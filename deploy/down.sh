#!/usr/bin/env bash
# Stop and remove the fleet: containers, networks and volumes (`down -v`).
#   deploy/down.sh            (EGRESSD_PROJECT picks the project, default egressd)
set -euo pipefail
source "$(dirname "$0")/lib.sh"
export EGRESSD_TAG=${EGRESSD_TAG:-latest}
"${COMPOSE[@]}" -p "$PROJECT" -f "$DEPLOY_DIR/compose.yaml" --profile images --profile load --profile monitoring \
    down -v --remove-orphans --timeout 20
