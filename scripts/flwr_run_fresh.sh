#!/usr/bin/env bash
# `flwr run .` as Flower's docs describe it, checked from scratch: a fresh FLWR_HOME, a local simulation
# SuperLink that installs the app's dependencies itself (Flower's uv sync into a runtime environment of its
# own, from the package index: torch and the rest, several GB with a CUDA torch), and a tiny run on it.
#
#   bash scripts/flwr_run_fresh.sh            # prints the run's summary line and Flower's status; exit 1 unless
#                                             # the status is finished:completed and the summary is there
#
# Needs the package index (simulate.sh is the offline path). Environment: SEEDTUNE_DATA (default ../shared/data).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=$(dirname "${PYTHON:-$ROOT/.venv/bin/python}")
WORK=$(mktemp -d /tmp/seedtune-flwr-XXXXXX)
export PATH="$BIN:$PATH" FLWR_HOME=$WORK/flwr-home SEEDTUNE_SIMULATION=1 SEEDTUNE_PRIVACY_LEDGER=$WORK/holders.sqlite
export SEEDTUNE_DATA=${SEEDTUNE_DATA:-$(cd "$ROOT/../shared/data" 2>/dev/null && pwd)}
mkdir -p "$FLWR_HOME"
PORT=$("$BIN/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$BIN/flower-superlink" --simulation --insecure --host 127.0.0.1 --port "$PORT" --database "$WORK/superlink.db" \
    >"$WORK/superlink.log" 2>&1 &
LINK=$!
trap 'kill $LINK 2>/dev/null; wait $LINK 2>/dev/null' EXIT
for _ in $(seq 1 120); do
    "$BIN/python" -c "import socket; socket.create_connection(('127.0.0.1', $PORT), 1)" 2>/dev/null && break
    sleep 0.5
done
cat >"$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "local"

[superlink.local]
address = "127.0.0.1:$PORT"
insecure = true
TOML
"$BIN/flwr" run . local --stream --federation-config "num-supernodes=2" --run-config \
    "out_dir=\"$WORK/run\" model.name=\"tiny-encoder\" federation.rounds=2 federation.local_steps=2 data.train_size=400 data.test_size=64 eval.dev_size=32" \
    >"$WORK/flwr-run.log" 2>&1
STATUS=$("$BIN/flwr" ls local --format json 2>/dev/null | "$BIN/python" -c 'import json, sys; print(" ".join(r["status"] for r in json.load(sys.stdin)["runs"]))')
echo "flwr_run_fresh: Flower status ${STATUS:-unknown}; logs in $WORK" >&2
[ -s "$WORK/run/summary.json" ] && [ "$STATUS" = "finished:completed" ] || exit 1
"$BIN/python" -c 'import json, sys; s = json.load(open(sys.argv[1])); print(json.dumps({k: s[k] for k in ("rounds", "ledger_entries", "epsilon_max", "clients_agree", "client_runtimes")}))' "$WORK/run/summary.json"
