#!/usr/bin/env bash
# The attack docs/deployment.md's threat model names, against a federation started by start_local.sh: someone
# who knows only the SuperLink's address and holds ca.crt registers a key of their own through the Control API
# (Flower 1.41 lets them) and brings a SuperNode online that claims an honest holder's name ("node-0") with an
# identity key of its own. The SuperLink admits it; a seedtune federation that pins its nodes
# (federation.allowed_nodes=$SEEDTUNE_ALLOWED_NODES) must send it nothing but the identity challenge.
#
# Usage: scripts/deploy/start_rogue.sh STATE
# Writes STATE/rogue/ (its own FLWR_HOME and keys), STATE/node_ids/rogue, STATE/logs/rogue.log and
# STATE/pids/rogue.pid (stop_local.sh stops it with the rest). Prints "ROGUE node_id=N" once it is online.
set -euo pipefail

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
open_state "" "$@"
resolve_flwr_bin

ROGUE="$STATE/rogue"
mkdir -p "$ROGUE/flwr_home"
"$DEPLOY_DIR/make_node_keys.sh" "$ROGUE" 1 rogue >/dev/null      # its Flower key
"$DEPLOY_DIR/make_node_keys.sh" "$ROGUE" 1 identity >/dev/null   # its seedtune identity key, on no list
cat >"$ROGUE/flwr_home/config.toml" <<TOML
[superlink]
default = "rogue"

[superlink.rogue]
address = "$SUPERLINK_ADDRESS"
root-certificates = "$FLWR_CA_CERT"
TOML
out=$(FLWR_HOME="$ROGUE/flwr_home" flwr_json supernode register "$ROGUE/rogue_1.pub" rogue) \
    || { echo "start_rogue.sh: the Control API refused to register the rogue key (the gap is closed here)"; exit 3; }
node_id=$(json_get node-id <<<"$out")
echo "$node_id" >"$STATE/node_ids/rogue"
init_holder_ledger "$ROGUE/privacy-ledger.sqlite"
PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
spawn rogue "$STATE/logs/rogue.log" FLWR_HOME="$ROGUE" -- \
    "$FLWR_BIN/flower-supernode" --superlink "$SUPERLINK_ADDRESS" --root-certificates "$FLWR_CA_CERT" \
    --auth-supernode-private-key "$ROGUE/rogue_1" --port "$PORT" \
    --node-config "partition-id=0 num-partitions=$FLWR_NUM_NODES holder=\"node-0\" epsilon-budget=100 delta=1e-5 privacy-ledger=\"$ROGUE/privacy-ledger.sqlite\" node-key=\"$ROGUE/identity_1\""
wait_for_line rogue "$STATE/logs/rogue.log" "SuperNode ID: $node_id" \
    || { echo "start_rogue.sh: the rogue SuperNode did not come online"; tail -n 20 "$STATE/logs/rogue.log"; exit 1; }
echo "ROGUE node_id=$node_id"
