#!/usr/bin/env bash
# Negative check against a federation started by start_local.sh: start ONE extra
# SuperNode that the SuperLink must refuse, and report how it was refused.
#
# Usage: scripts/deploy/check_refusal.sh STATE MODE
#   MODE = unregistered  TLS + a valid ECDSA key that was never registered
#                        (KEY_DIR/unregistered_1, made by start_local.sh)
#        = plaintext     --insecure (no TLS) and no key; started with
#                        --max-wait-time 10, so it gives up by itself
#        = nokey         TLS, but no --auth-supernode-private-key
#   CHECK_TIMEOUT  seconds before giving up on the node (default 40)
#
# Log: STATE/logs/refused_MODE.log. Prints "REFUSED exit_code=N ..." and the
# error lines, exit 0, if the node was refused; "ACCEPTED ..." and exit 1 if it
# connected (it is then stopped); "TIMEOUT ..." and exit 3 if neither happened.
set -uo pipefail

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
open_state "unregistered|plaintext|nokey" "$@"
MODE=$2
CHECK_TIMEOUT=${CHECK_TIMEOUT:-40}
resolve_flwr_bin || exit 2

case $MODE in
    unregistered)
        key="$FLWR_KEY_DIR/unregistered_1"
        [[ -f "$key" ]] || "$DEPLOY_DIR/make_node_keys.sh" "$FLWR_KEY_DIR" 1 unregistered >/dev/null
        args=(--root-certificates "$FLWR_CA_CERT" --auth-supernode-private-key "$key") ;;
    plaintext)
        args=(--insecure --max-wait-time 10) ;;
    nokey)
        args=(--root-certificates "$FLWR_CA_CERT") ;;
    *)
        echo "check_refusal.sh: unknown MODE $MODE" >&2; exit 2 ;;
esac

PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
NAME="refused_$MODE"
LOG="$STATE/logs/$NAME.log"
mkdir -p "$STATE/nodes/$NAME"
spawn "$NAME" "$LOG" FLWR_HOME="$STATE/nodes/$NAME" -- \
    "$FLWR_BIN/flower-supernode" --superlink "$SUPERLINK_ADDRESS" --port "$PORT" \
    --node-config "partition-id=0 num-partitions=1" "${args[@]}"
bgpid=$!

deadline=$((SECONDS + CHECK_TIMEOUT))
while kill -0 "$bgpid" 2>/dev/null; do
    if grep -q "SuperNode ID:" "$LOG"; then
        echo "ACCEPTED: the $MODE SuperNode connected: $(grep -m1 -o 'SuperNode ID: [0-9]*' "$LOG")"
        stop_pidfile "$STATE/pids/$NAME.pid" >/dev/null
        exit 1
    fi
    if (( SECONDS >= deadline )); then
        echo "TIMEOUT: the $MODE SuperNode neither connected nor exited in ${CHECK_TIMEOUT}s (log: $LOG)"
        stop_pidfile "$STATE/pids/$NAME.pid" >/dev/null
        exit 3
    fi
    sleep 0.2
done
wait "$bgpid"; rc=$?
rm -f "$STATE/pids/$NAME.pid"
echo "REFUSED exit_code=$rc mode=$MODE log=$LOG"
# The lines that say why (ANSI colour codes stripped).
sed 's/\x1b\[[0-9;]*m//g' "$LOG" | grep -E "ERROR|Exit Code|code: [0-9]+|SSL|Giving up|Failed|disconnected|private key" | head -n 8
exit 0
