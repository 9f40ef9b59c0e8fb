#!/usr/bin/env bash
# The main job: a federated private finetuning simulation (the head stage by default) on this machine, offline,
# with `flwr run .`.
#
#   bash scripts/simulate.sh [extra --run-config overrides, e.g. "federation.rounds=20" "privacy.epsilon=1"]
#
# Overrides may come as one string or several arguments; each key must be one of pyproject.toml's
# [tool.flwr.app.config] (Flower refuses any other); everything else goes in a config file (config-file).
#
# `flwr run .` alone would try to install the app's dependencies with uv (fails offline; DESIGN.md section 5),
# so this starts a simulation SuperLink with runtime dependency installation disabled, points a `flwr`
# connection at it, runs the app, waits for it and fails if the run did not finish successfully.
# A task preset: "config-file=\"configs/trec.toml\"" (its task.* and data.* keys; the head stage trains TREC's head).
# SEEDTUNE_RECIPE=configs/federated_dpzo.toml: the DP-ZO recipe in place of the head stage (its keys as overrides,
# before yours; a key=value you give wins). A config-file's keys lose to every app-config key (pyproject.toml's
# defaults, the recipe's, yours): presets set task.*, data.* and other non-app keys; the server warns of any other. Environment: NODES (10), RUN_DIR (runs/federated-<time>), SEEDTUNE_DATA (the data root holding one folder
# per task, default ../shared/data), NUM_CPUS
# per simulated client (1), NUM_GPUS per simulated client (0; e.g. 0.25 puts four clients on one GPU, with
# "model.device=cuda" in the overrides), FLWR_HOME (.flwr), SEEDTUNE_PRIVACY_LEDGER
# (runs/simulated-holders.sqlite). The server's signing key is RUN_DIR/server_1 (made on first use, unless the
# overrides name federation.server_key), pinned by every simulated node.
set -euo pipefail
if [ -n "${SEEDTUNE_RECIPE:-}" ] && [ -f "$SEEDTUNE_RECIPE" ]; then  # relative to where you call from
    SEEDTUNE_RECIPE=$(cd "$(dirname "$SEEDTUNE_RECIPE")" && pwd)/$(basename "$SEEDTUNE_RECIPE")
fi
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-$ROOT/.venv/bin/python}
BIN=$(dirname "$PY")
export PATH="$BIN:$PATH"  # the SuperLink starts flower-superexec and the app processes from PATH
NODES=${NODES:-10}
RUN_DIR=${RUN_DIR:-$ROOT/runs/federated-$(date +%Y%m%d-%H%M%S)}
DATA=${SEEDTUNE_DATA:-$ROOT/../shared/data}
export FLWR_HOME=${FLWR_HOME:-$ROOT/.flwr}
# The simulated nodes' data holders keep their privacy ledger here, across simulations: a second simulation
# over the same data continues their spending (and is refused past the budget). Delete it, or point
# SEEDTUNE_PRIVACY_LEDGER elsewhere, to simulate fresh data holders.
export SEEDTUNE_SIMULATION=1
export SEEDTUNE_PRIVACY_LEDGER=${SEEDTUNE_PRIVACY_LEDGER:-$ROOT/runs/simulated-holders.sqlite}
mkdir -p "$RUN_DIR" "$FLWR_HOME"
RUN_DIR=$(cd "$RUN_DIR" && pwd)
# The server and every simulated client look a task's folder (data.data_dir, default task.name) up here.
[ -d "$DATA" ] && export SEEDTUNE_DATA=$(cd "$DATA" && pwd)

USER_OVERRIDES="$*"
if [ -n "${SEEDTUNE_RECIPE:-}" ]; then  # a TOML of app-config keys, as overrides before yours; a key you set wins
    RECIPE_OVERRIDES=$("$PY" -c 'import sys
from seedtune.shared.task.config import ConfigError, recipe_overrides
try:
    print(recipe_overrides(sys.argv[1], sys.argv[2]))
except ConfigError as exc:
    sys.exit(f"simulate: SEEDTUNE_RECIPE: {exc}")' "$SEEDTUNE_RECIPE" "$USER_OVERRIDES") || exit 2
    USER_OVERRIDES="$RECIPE_OVERRIDES $USER_OVERRIDES"
fi
case "$USER_OVERRIDES" in
    *out_dir=*) echo "simulate: set the run folder with RUN_DIR=..., not out_dir" >&2; exit 2 ;;
esac
KEY_OVERRIDE=""
# The server signs its ledger with a key kept in the run folder, and the simulated nodes pin its public key
# (SEEDTUNE_SERVER_KEY): a ledger rewritten behind them (another header, every hash recomputed) is refused as
# a fork, and a resumed server refuses rounds its key did not sign (docs/deployment.md, "Threat model").
case "$USER_OVERRIDES" in
    *federation.server_key=*) ;;
    *)
        PYTHON="$PY" scripts/deploy/make_node_keys.sh "$RUN_DIR" 1 server >/dev/null  # kept if present
        export SEEDTUNE_SERVER_KEY="$RUN_DIR/server_1.pub"
        KEY_OVERRIDE="federation.server_key=\"$RUN_DIR/server_1\""
        ;;
esac

PORT=${PORT:-$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
LINK_LOG=$RUN_DIR/superlink.log
"$BIN/flower-superlink" --simulation --insecure --disable-runtime-dependency-installation \
    --host 127.0.0.1 --port "$PORT" --database "$RUN_DIR/superlink.db" >"$LINK_LOG" 2>&1 &
LINK_PID=$!
trap 'kill $LINK_PID 2>/dev/null; wait $LINK_PID 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
    grep -q "Starting Flower SuperLink\|Flower Deployment Runtime\|listening" "$LINK_LOG" 2>/dev/null && \
        "$PY" -c "import socket,sys; socket.create_connection(('127.0.0.1', $PORT), 1)" 2>/dev/null && break
    kill -0 $LINK_PID 2>/dev/null || { echo "simulate: the SuperLink exited; see $LINK_LOG" >&2; cat "$LINK_LOG" >&2; exit 1; }
    sleep 0.5
done

cat >"$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "seedtune-sim"

[superlink.seedtune-sim]
address = "127.0.0.1:$PORT"
insecure = true
TOML

OVERRIDES="out_dir=\"$RUN_DIR\" $USER_OVERRIDES $KEY_OVERRIDE"
echo "simulate: $NODES clients, run folder $RUN_DIR" >&2
"$BIN/flwr" run . seedtune-sim --stream --run-config "$OVERRIDES" \
    --federation-config "num-supernodes=$NODES client-resources-num-cpus=${NUM_CPUS:-1} client-resources-num-gpus=${NUM_GPUS:-0}" \
    2>&1 | tee "$RUN_DIR/flwr-run.log"

# `flwr run` exits 0 even when the run failed: the run's summary is the proof it finished. A ServerApp that
# raised ends its run with Flower's status finished:failed and the error as its details: shown here.
if [ ! -s "$RUN_DIR/summary.json" ]; then
    RUN_ID=$(grep -o "run [0-9]\+" "$RUN_DIR/flwr-run.log" | head -1 | grep -o "[0-9]\+" || true)
    if [ -n "$RUN_ID" ]; then
        "$BIN/flwr" ls seedtune-sim --run-id "$RUN_ID" --format json 2>/dev/null | "$PY" -c '
import json, sys
try:
    runs = json.load(sys.stdin).get("runs", [])
except ValueError:
    runs = []
for run in runs:
    print("simulate: run %s status %s" % (run.get("run-id"), run.get("status")), file=sys.stderr)' || true
    fi
    grep -h "seedtune: run failed" "$RUN_DIR/flwr-run.log" "$LINK_LOG" 2>/dev/null | tail -1 >&2 || true
    echo "simulate: the run did not finish (no summary.json); see $RUN_DIR/flwr-run.log and $LINK_LOG" >&2
    exit 1
fi
echo "simulate: done; ledger, metrics and plots in $RUN_DIR" >&2
cat "$RUN_DIR/summary.json"
