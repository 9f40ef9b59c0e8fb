#!/usr/bin/env bash
# Stop everything start_local.sh (and check_refusal.sh / rotate_node_key.sh)
# started in STATE: SuperNodes first, then the SuperLink, with their SuperExec /
# ServerApp / ClientApp children (Flower starts those in their own sessions).
#
# Usage: scripts/deploy/stop_local.sh STATE
#   STOP_TIMEOUT  seconds to wait after SIGTERM before SIGKILL (default 10)
# Only PIDs recorded in STATE/pids/*.pid and their descendants are signalled,
# and only while their command line still names a Flower executable.
set -uo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 STATE" >&2
    exit 2
fi
STATE=$1
[[ -d "$STATE/pids" ]] || { echo "[stop_local] nothing to stop in $STATE"; exit 0; }
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

shopt -s nullglob
for pf in "$STATE"/pids/*.pid; do
    [[ $(basename "$pf") == superlink.pid ]] || stop_pidfile "$pf"
done
[[ -f "$STATE/pids/superlink.pid" ]] && stop_pidfile "$STATE/pids/superlink.pid"
exit 0
