#!/usr/bin/env bash
# Start a local Flower federation on 127.0.0.1 with TLS and SuperNode
# authentication (flwr 1.41):
#   1 SuperLink (Fleet + Control + Runtime APIs share ONE HTTPS port),
#   N SuperNodes, each with its own registered ECDSA key and
#   --node-config "partition-id=I num-partitions=N holder=node-I epsilon-budget=E delta=D
#   privacy-ledger=STATE/nodes/node_I/privacy-ledger.sqlite node-key=KEY_DIR/identity_J
#   server-key=KEY_DIR/server_1.pub" (I = 0..N-1, J = I+1; the server signs with KEY_DIR/server_1),
#   STATE/allowed_nodes: each holder with the public key of its identity key (identity_J), the list a
#   seedtune federation pins (federation.allowed_nodes; see docs/deployment.md, "Threat model"); the identity
#   keys are not the Flower keys, so rotate_node_key.sh does not change the list,
#   a flwr CLI connection [superlink.$CONNECTION_NAME] in $FLWR_HOME/config.toml.
# Then run any Flower app with:
#   source STATE/env.sh && flwr run APPDIR "$FLWR_CONNECTION" --stream
# and seedtune, pinned to these nodes, with:
#   flwr run . "$FLWR_CONNECTION" --stream --run-config \
#     "federation.allowed_nodes='$SEEDTUNE_ALLOWED_NODES' federation.server_key='$SEEDTUNE_SERVER_KEY'"
#
# Usage: scripts/deploy/start_local.sh STATE [NUM_NODES]
#
# Environment (all optional):
#   NUM_NODES            number of SuperNodes (default 2; the 2nd argument wins)
#   SUPERLINK_PORT       SuperLink HTTPS port (default: a free port)
#   SUPERNODE_PORTS      space-separated ports for the SuperNodes' local
#                        Runtime API, one per node (default: free ports)
#   CONNECTION_NAME      flwr connection name (default: local-tls)
#   FLWR_HOME            flwr CLI home holding config.toml (default: STATE/flwr_home);
#                        an existing config.toml keeps its other sections
#   CERT_DIR, KEY_DIR    TLS certificates / node keys (default: STATE/certs, STATE/keys);
#                        generated if missing, reused if present
#   SUPERLINK_DB         SuperLink database (default: STATE/superlink.db, deleted at
#                        start unless KEEP_DB=1)
#   NODE_EPSILON_BUDGET, NODE_DELTA  each node's own privacy budget (default 3.0, 1e-5): a
#                        deployed node refuses to start work without one
#   NODE_CONFIG_EXTRA    extra "k=v ..." appended to every node's --node-config
#   NODE_CONFIG_<I>      extra "k=v ..." for the node with partition-id I only, e.g.
#                        NODE_CONFIG_1="runtime=onnx onnx-model=/models/model.onnx"
#   EXTRA_UNREGISTERED_KEYS  number of extra key pairs unregistered_J that are NOT
#                        registered (for check_refusal.sh), default 1
#   START_TIMEOUT        seconds to wait for each component (default 60)
#   FLWR_BIN             folder with flower-superlink, flower-supernode, flwr
#                        (default: REPO/.venv/bin if present, else PATH)
#   SUPERLINK_EXTRA_ARGS, SUPERNODE_EXTRA_ARGS  extra flags (word-split)
#
# Writes to STATE: pids/*.pid, logs/*.log, node_ids/node_I, nodes/node_I/{port,
# node_config, privacy-ledger.sqlite (seedtune holder init; kept if present)}, env.sh, ports. On any failure it prints the reason and the tail
# of the relevant log, stops what it started and exits 1.
# Stop with: scripts/deploy/stop_local.sh STATE
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 STATE [NUM_NODES]" >&2
    exit 2
fi
mkdir -p "$1"
STATE=$(cd "$1" && pwd)
NUM_NODES=${2:-${NUM_NODES:-2}}
[[ "$NUM_NODES" =~ ^[1-9][0-9]*$ ]] || { echo "start_local.sh: NUM_NODES must be >= 1" >&2; exit 2; }

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
resolve_flwr_bin

CONNECTION_NAME=${CONNECTION_NAME:-local-tls}
FLWR_HOME=${FLWR_HOME:-$STATE/flwr_home}
CERT_DIR=${CERT_DIR:-$STATE/certs}
KEY_DIR=${KEY_DIR:-$STATE/keys}
SUPERLINK_DB=${SUPERLINK_DB:-$STATE/superlink.db}
EXTRA_UNREGISTERED_KEYS=${EXTRA_UNREGISTERED_KEYS:-1}
export FLWR_HOME

log() { echo "[start_local] $*"; }
die() {  # die MESSAGE [LOGFILE]
    echo "[start_local] ERROR: $1" >&2
    if [[ -n "${2:-}" && -f "$2" ]]; then
        echo "----- last lines of $2 -----" >&2
        tail -n 25 "$2" >&2
        echo "-----" >&2
    fi
    log "stopping what was started" >&2
    "$DEPLOY_DIR/stop_local.sh" "$STATE" >&2 || true
    exit 1
}

mkdir -p "$STATE/pids" "$STATE/logs" "$STATE/node_ids" "$FLWR_HOME"

# Refuse to start twice on the same STATE.
for pf in "$STATE"/pids/*.pid; do
    [[ -e "$pf" ]] || continue
    if is_flower "$(cat "$pf")"; then
        echo "start_local.sh: $pf is still running; run stop_local.sh $STATE first" >&2
        exit 1
    fi
    rm -f "$pf"
done
rm -f "$STATE"/node_ids/* "$STATE"/logs/*.log "$STATE/env.sh"

# ---- 1. certificates and node keys ---------------------------------------------
"$DEPLOY_DIR/make_certs.sh" "$CERT_DIR" >/dev/null
"$DEPLOY_DIR/make_node_keys.sh" "$KEY_DIR" "$NUM_NODES" node >/dev/null
"$DEPLOY_DIR/make_node_keys.sh" "$KEY_DIR" "$NUM_NODES" identity >/dev/null  # seedtune's pinned node keys
"$DEPLOY_DIR/make_node_keys.sh" "$KEY_DIR" 1 server >/dev/null  # seedtune's server key, pinned by every node
if (( EXTRA_UNREGISTERED_KEYS > 0 )); then
    "$DEPLOY_DIR/make_node_keys.sh" "$KEY_DIR" "$EXTRA_UNREGISTERED_KEYS" unregistered >/dev/null
fi
CERT_DIR=$(cd "$CERT_DIR" && pwd)   # absolute paths: SuperExec children get them too
KEY_DIR=$(cd "$KEY_DIR" && pwd)
CA="$CERT_DIR/ca.crt"
ALLOWED="$STATE/allowed_nodes"
{
    echo "# seedtune federation.allowed_nodes: HOLDER PUBLIC-KEY [COMMENT] (written by start_local.sh)"
    for ((i = 1; i <= NUM_NODES; i++)); do
        echo "node-$((i - 1)) $(cat "$KEY_DIR/identity_$i.pub")"
    done
} >"$ALLOWED"

# ---- 2. ports --------------------------------------------------------------------
read -r -a FREE <<<"$("$PY" - $((NUM_NODES + 1)) <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
)"
SUPERLINK_PORT=${SUPERLINK_PORT:-${FREE[0]}}
if [[ -n "${SUPERNODE_PORTS:-}" ]]; then
    read -r -a SN_PORTS <<<"$SUPERNODE_PORTS"
    (( ${#SN_PORTS[@]} >= NUM_NODES )) || { echo "start_local.sh: SUPERNODE_PORTS needs $NUM_NODES ports" >&2; exit 2; }
else
    SN_PORTS=("${FREE[@]:1}")
fi
SUPERLINK_ADDRESS="127.0.0.1:$SUPERLINK_PORT"
FLWR_CA_CERT=$CA

# ---- 3. flwr CLI connection: [superlink.NAME] in $FLWR_HOME/config.toml -------------
"$PY" - "$FLWR_HOME/config.toml" "$CONNECTION_NAME" "$SUPERLINK_ADDRESS" "$CA" <<'EOF'
import sys, tomllib
from pathlib import Path
path, name, address, ca = Path(sys.argv[1]), *sys.argv[2:]
cfg = tomllib.loads(path.read_text()) if path.exists() else {}
sl = cfg.setdefault("superlink", {})
sl.setdefault("default", name)
sl[name] = {"address": address, "root-certificates": ca}
try:
    import tomli_w  # a flwr dependency
    text = tomli_w.dumps(cfg)
except ImportError:  # minimal writer, enough for flwr's layout
    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return str(v)
        return '"%s"' % str(v).replace("\\", "\\\\").replace('"', '\\"')
    lines = []
    def emit(prefix, d):
        scal = {k: v for k, v in d.items() if not isinstance(v, dict)}
        if prefix and scal:
            lines.append(f"[{prefix}]")
        lines.extend(f"{k} = {val(v)}" for k, v in scal.items())
        if scal:
            lines.append("")
        for k, v in d.items():
            if isinstance(v, dict):
                emit(f"{prefix}.{k}" if prefix else k, v)
    emit("", cfg)
    text = "\n".join(lines)
path.write_text(text)
EOF

# ---- 4. SuperLink --------------------------------------------------------------------
[[ "${KEEP_DB:-0}" == 1 ]] || rm -f "$SUPERLINK_DB" "$SUPERLINK_DB"-wal "$SUPERLINK_DB"-shm
mkdir -p "$STATE/superlink_home"
log "SuperLink on https://$SUPERLINK_ADDRESS (TLS + SuperNode authentication)"
# shellcheck disable=SC2086
spawn superlink "$STATE/logs/superlink.log" FLWR_HOME="$STATE/superlink_home" -- \
    "$FLWR_BIN/flower-superlink" \
    --ssl-ca-certfile "$CA" \
    --ssl-certfile "$CERT_DIR/server.pem" \
    --ssl-keyfile "$CERT_DIR/server.key" \
    --enable-supernode-auth \
    --disable-runtime-dependency-installation \
    --host 127.0.0.1 --port "$SUPERLINK_PORT" \
    --database "$SUPERLINK_DB" \
    ${SUPERLINK_EXTRA_ARGS:-}
wait_for_line superlink "$STATE/logs/superlink.log" "Uvicorn running on https://127\.0\.0\.1:$SUPERLINK_PORT" \
    || die "the SuperLink did not come up" "$STATE/logs/superlink.log"
flwr_json supernode list "$CONNECTION_NAME" >/dev/null \
    || die "the flwr CLI cannot reach the SuperLink over TLS" "$STATE/logs/superlink.log"

# ---- 5. register the node public keys ----------------------------------------------------
for ((i = 1; i <= NUM_NODES; i++)); do
    out=$(flwr_json supernode register "$KEY_DIR/node_$i.pub" "$CONNECTION_NAME") \
        || die "registering $KEY_DIR/node_$i.pub failed (a key that was ever registered, even if unregistered since, cannot be registered again)" "$STATE/logs/superlink.log"
    node_id=$(json_get node-id <<<"$out")
    echo "$node_id" >"$STATE/node_ids/node_$i"
    log "registered node_$i.pub -> node id $node_id"
done

# ---- 6. SuperNodes ---------------------------------------------------------------------------
for ((i = 1; i <= NUM_NODES; i++)); do
    mkdir -p "$STATE/nodes/node_$i"
    echo "${SN_PORTS[$((i - 1))]}" >"$STATE/nodes/node_$i/port"
    own_var="NODE_CONFIG_$((i - 1))"
    own=${!own_var:-}
    budget="holder=\"node-$((i - 1))\" epsilon-budget=${NODE_EPSILON_BUDGET:-3.0} delta=${NODE_DELTA:-1e-5}"
    budget="$budget privacy-ledger=\"$STATE/nodes/node_$i/privacy-ledger.sqlite\" node-key=\"$KEY_DIR/identity_$i\""
    budget="$budget server-key=\"$KEY_DIR/server_1.pub\""
    echo "partition-id=$((i - 1)) num-partitions=$NUM_NODES $budget${NODE_CONFIG_EXTRA:+ $NODE_CONFIG_EXTRA}${own:+ $own}" \
        >"$STATE/nodes/node_$i/node_config"
    init_holder_ledger "$STATE/nodes/node_$i/privacy-ledger.sqlite"
    start_supernode "$i" "$KEY_DIR/node_$i"
done
for ((i = 1; i <= NUM_NODES; i++)); do
    wait_for_line "supernode_$i" "$STATE/logs/supernode_$i.log" "SuperNode ID: $(cat "$STATE/node_ids/node_$i")" \
        || die "SuperNode $i did not connect" "$STATE/logs/supernode_$i.log"
done

# All registered nodes must be reported online by the SuperLink.
deadline=$((SECONDS + START_TIMEOUT))
while :; do
    out=$(flwr_json supernode list "$CONNECTION_NAME" 2>/dev/null) || out='{}'
    online=$("$PY" -c '
import json, sys
d = json.loads(sys.stdin.read())
print(sum(n.get("status") == "online" for n in d.get("nodes", [])))' <<<"$out")
    (( online >= NUM_NODES )) && break
    (( SECONDS < deadline )) || die "only $online/$NUM_NODES SuperNodes online after ${START_TIMEOUT}s" "$STATE/logs/superlink.log"
    sleep 0.5
done

# ---- 7. summary -------------------------------------------------------------------------------
cat >"$STATE/env.sh" <<EOF
# source this file to use the federation started by start_local.sh
export FLWR_HOME="$FLWR_HOME"
export FLWR_CONNECTION="$CONNECTION_NAME"
export SUPERLINK_ADDRESS="$SUPERLINK_ADDRESS"
export FLWR_CA_CERT="$FLWR_CA_CERT"
export FLWR_KEY_DIR="$KEY_DIR"
export FLWR_BIN="$FLWR_BIN"
export FLWR_STATE="$STATE"
export FLWR_NUM_NODES=$NUM_NODES
export SEEDTUNE_ALLOWED_NODES="$ALLOWED"
export SEEDTUNE_SERVER_KEY="$KEY_DIR/server_1"
export PATH="$FLWR_BIN:\$PATH"
EOF
echo "superlink=$SUPERLINK_PORT supernodes=${SN_PORTS[*]:0:$NUM_NODES}" >"$STATE/ports"
log "$NUM_NODES SuperNodes online; connection '$CONNECTION_NAME' in $FLWR_HOME/config.toml"
log "run an app:  source $STATE/env.sh && flwr run APPDIR \"\$FLWR_CONNECTION\" --stream"
log "stop:        $DEPLOY_DIR/stop_local.sh $STATE"
