# Shared helpers for scripts/deploy/*.sh (sourced, not executed).
# Callers set: STATE (absolute), and optionally FLWR_BIN, START_TIMEOUT, STOP_TIMEOUT.

DEPLOY_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DEPLOY_REPO=$(cd "$DEPLOY_DIR/../.." && pwd)
START_TIMEOUT=${START_TIMEOUT:-60}
STOP_TIMEOUT=${STOP_TIMEOUT:-10}

# resolve_flwr_bin: set FLWR_BIN (REPO/.venv/bin, else PATH), PATH and PY.
resolve_flwr_bin() {
    if [[ -z "${FLWR_BIN:-}" ]]; then
        if [[ -x "$DEPLOY_REPO/.venv/bin/flower-superlink" ]]; then
            FLWR_BIN="$DEPLOY_REPO/.venv/bin"
        else
            FLWR_BIN=$(dirname "$(command -v flower-superlink || echo /nonexistent/x)")
        fi
    fi
    local exe
    for exe in flower-superlink flower-supernode flower-superexec flwr; do
        [[ -x "$FLWR_BIN/$exe" ]] || { echo "deploy: $exe not found in $FLWR_BIN (set FLWR_BIN)" >&2; return 1; }
    done
    # Flower starts flower-superexec, flwr-serverapp and flwr-clientapp by name.
    export PATH="$FLWR_BIN:$PATH"
    PY="$FLWR_BIN/python"
    [[ -x "$PY" ]] || PY=python3
}

# init_holder_ledger PATH: create a data holder's privacy ledger once (a deployed node refuses to run without
# it, and an existing one is kept: it holds what the holder has spent).
init_holder_ledger() {
    [[ -f "$1" ]] || "$PY" -m seedtune holder init --ledger "$1" >/dev/null
}

# spawn NAME LOGFILE [VAR=VALUE...] -- CMD...: start CMD detached in its own
# session/process group; stdout+stderr to LOGFILE; PID to STATE/pids/NAME.pid.
spawn() {
    local name=$1 logf=$2; shift 2
    local envs=()
    while [[ $1 != -- ]]; do envs+=("$1"); shift; done
    shift
    mkdir -p "$STATE/pids"
    rm -f "$STATE/pids/$name.pid"
    env "${envs[@]}" setsid bash -c 'echo $$ > "$0"; exec "$@"' \
        "$STATE/pids/$name.pid" "$@" >"$logf" 2>&1 </dev/null &
    local t=0
    while [[ ! -s "$STATE/pids/$name.pid" ]] && (( t < 50 )); do sleep 0.1; t=$((t + 1)); done
}

# wait_for_line NAME LOGFILE REGEX: return 0 once REGEX is in LOGFILE; 1 if the
# process died, 2 after START_TIMEOUT seconds.
wait_for_line() {
    local name=$1 logf=$2 regex=$3 pid deadline=$((SECONDS + START_TIMEOUT))
    pid=$(cat "$STATE/pids/$name.pid")
    until grep -Eq "$regex" "$logf" 2>/dev/null; do
        kill -0 "$pid" 2>/dev/null || { echo "deploy: $name (pid $pid) exited before it was ready" >&2; return 1; }
        (( SECONDS < deadline )) || { echo "deploy: $name not ready after ${START_TIMEOUT}s (waited for /$regex/ in $logf)" >&2; return 2; }
        sleep 0.2
    done
}

# flwr_json ARGS...: run `flwr ARGS --format json`; print the JSON; fail unless
# it says "success": true (flwr exits 0 in JSON mode even on errors).
flwr_json() {
    local out
    out=$("$FLWR_BIN/flwr" "$@" --format json 2>&1) || true
    if ! "$PY" -c 'import json,sys; d=json.loads(sys.stdin.read()); sys.exit(0 if d.get("success") else 1)' <<<"$out" 2>/dev/null; then
        echo "$out" >&2
        return 1
    fi
    printf '%s\n' "$out"
}

# json_get KEY: read JSON on stdin, print top-level KEY.
json_get() { "$PY" -c 'import json,sys; print(json.loads(sys.stdin.read())[sys.argv[1]])' "$1"; }

# start_supernode I KEYFILE: start SuperNode I with the settings saved in
# STATE/nodes/node_I/{port,node_config} and STATE/env.sh values.
start_supernode() {
    local i=$1 key=$2 dir="$STATE/nodes/node_$1"
    # shellcheck disable=SC2086
    spawn "supernode_$i" "$STATE/logs/supernode_$i.log" FLWR_HOME="$dir" -- \
        "$FLWR_BIN/flower-supernode" \
        --superlink "$SUPERLINK_ADDRESS" \
        --root-certificates "$FLWR_CA_CERT" \
        --auth-supernode-private-key "$key" \
        --port "$(cat "$dir/port")" \
        --node-config "$(cat "$dir/node_config")" \
        ${SUPERNODE_EXTRA_ARGS:-}
}

# is_flower PID: alive (not a zombie) and a Flower process (guards against PID reuse).
is_flower() {
    [[ -r /proc/$1/cmdline ]] && tr '\0' ' ' </proc/"$1"/cmdline | grep -Eq 'flower-|flwr-|flwr '
}

_descendants() {
    local c
    for c in $(ps -o pid= --ppid "$1" 2>/dev/null || true); do
        echo "$c"
        _descendants "$c"
    done
}

_alive() { kill -0 "$1" 2>/dev/null && [[ "$(ps -o stat= -p "$1" 2>/dev/null)" != Z* ]]; }

# stop_pidfile PIDFILE: SIGTERM the process group and all descendants (Flower
# puts SuperExec/ServerApp/ClientApp in their own sessions), SIGKILL after
# STOP_TIMEOUT seconds, remove PIDFILE.
stop_pidfile() {
    local pf=$1 name pid kids p t alive
    name=$(basename "$pf" .pid)
    pid=$(cat "$pf" 2>/dev/null || true)
    if [[ -z "$pid" ]] || ! is_flower "$pid"; then
        rm -f "$pf"
        return 0
    fi
    kids=$(_descendants "$pid")
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for p in $kids; do kill -TERM "$p" 2>/dev/null || true; done
    t=0
    while (( t < STOP_TIMEOUT * 10 )); do
        alive=0
        for p in $pid $kids; do if _alive "$p"; then alive=1; fi; done
        (( alive )) || break
        sleep 0.1; t=$((t + 1))
    done
    for p in $pid $kids; do
        if _alive "$p"; then
            echo "[deploy] $name: pid $p ignored SIGTERM, sending SIGKILL"
            kill -KILL "$p" 2>/dev/null || true
        fi
    done
    echo "[deploy] stopped $name (pid $pid)"
    rm -f "$pf"
}

# open_state USAGE_ARGS "$@": check there is STATE (and one more argument when USAGE_ARGS names one), set STATE
# (absolute) and source its env.sh.
open_state() {
    local usage=$1; shift
    if [[ $# -lt 1 || ( -n $usage && $# -lt 2 ) ]]; then
        echo "usage: $(basename "$0") STATE${usage:+ $usage}" >&2
        exit 2
    fi
    STATE=$(cd "$1" && pwd)
    [[ -f "$STATE/env.sh" ]] || { echo "$(basename "$0"): $STATE/env.sh missing; run start_local.sh first" >&2; exit 2; }
    # shellcheck disable=SC1091
    source "$STATE/env.sh"
}
