#!/usr/bin/env bash
# The topology of deploy/compose.yaml as plain processes on this machine, on loopback:
# an MLflow server, the coordinator and N sites on generated demo data, with TLS and
# SuperNode authentication on. Each process is started by the same script the containers
# run (deploy/run/*.sh) from the same env files (deploy/env/*.env); only what differs on
# one machine is overridden (paths, 127.0.0.1, free ports, rounds) and printed. There is no
# nginx here: the sites connect to nearl-server's own Fleet-only proxy.
#
#   deploy/local-stack.sh [--sites N] [--rounds R] [--workdir DIR] [--train-per-site K]
#                         [--timeout S] [--keep-mlflow]
#
#   --sites N           sites (default 2)
#   --rounds R          global rounds (default 2)
#   --workdir DIR       where data, secrets, logs, checkpoints and the MLflow store go; a new
#                       or empty folder (default: a new folder under ${TMPDIR:-/tmp}); kept
#   --train-per-site K  training images per demo site (default 24)
#   --timeout S         give up on the federation after S seconds (default 1800)
#   --keep-mlflow       after the run, keep the MLflow server (UI) up until Ctrl-C
#
# It waits for the run to finish, prints where the MLflow UI is, and stops every process it
# started (on success, failure, Ctrl-C or SIGTERM). Exit code: the coordinator's (0 = all
# rounds done), 1 if the stack failed to come up or timed out, 2 for a bad argument.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
PROG="local-stack.sh"
sites=2 rounds=2 workdir="" train_per_site=24 timeout_s=1800 keep_mlflow=0

die() { echo "$PROG: error: $*" >&2; exit 2; }
say() { printf '[%s %s] %s\n' "$PROG" "$(date +%H:%M:%S)" "$*"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --sites) sites="${2:-}"; shift 2 || die "--sites needs a value" ;;
    --rounds) rounds="${2:-}"; shift 2 || die "--rounds needs a value" ;;
    --workdir) workdir="${2:-}"; shift 2 || die "--workdir needs a value" ;;
    --train-per-site) train_per_site="${2:-}"; shift 2 || die "--train-per-site needs a value" ;;
    --timeout) timeout_s="${2:-}"; shift 2 || die "--timeout needs a value" ;;
    --keep-mlflow) keep_mlflow=1; shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
for pair in "sites:$sites" "rounds:$rounds" "train-per-site:$train_per_site" "timeout:$timeout_s"; do
  [[ "${pair#*:}" =~ ^[1-9][0-9]*$ ]] || die "--${pair%%:*} ${pair#*:}: give a positive whole number"
done

# The project's environment: .venv of this checkout (as `make` creates it), else PATH.
venv="${NEARL_VENV:-$ROOT/.venv}"
[[ -x "$venv/bin/nearl-server" ]] && export PATH="$venv/bin:$PATH"
for tool in nearl nearl-server nearl-client mlflow python openssl ssh-keygen setsid ps; do
  command -v "$tool" >/dev/null || die "$tool not found; run 'make install' (or activate the NEARL environment) first"
done

if [[ -z "$workdir" ]]; then
  workdir="$(mktemp -d "${TMPDIR:-/tmp}/nearl-stack.XXXXXX")"
elif [[ -e "$workdir" && -n "$(ls -A "$workdir" 2>/dev/null)" ]]; then
  die "--workdir $workdir is not empty; give a new or empty folder (nothing in it is overwritten)"
fi
mkdir -p "$workdir"
W="$(cd "$workdir" && pwd)"
[[ "$W" != *[[:space:]]* ]] || die "--workdir $W: choose a path without spaces"
cd "$ROOT"
LOGS="$W/logs"
mkdir -p "$LOGS" "$W/run" "$W/sites"
exec 3>&1   # the console, for output from inside $(...)

# -- processes --------------------------------------------------------------------------------
names=() pids=() node_ports=()
cleaned=0

# Read an env file the way docker compose's env_file does for this project's files:
# KEY=VALUE per line, the value taken literally (no quotes, no expansion).
load_env() {
  local line key
  while IFS= read -r line || [[ -n "$line" ]]; do
    [[ "$line" =~ ^[[:space:]]*(#|$) ]] && continue
    key="${line%%=*}"
    [[ "$line" == *=* && "$key" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || { echo "$PROG: bad line in $1: $line" >&2; exit 2; }
    export "$key=${line#*=}"
  done < "$1"
}

# start NAME ENVFILES OVERRIDES -- COMMAND...: its own session (process group) and folder
# under $W/run, output to $LOGS/NAME.log. NEARL_STACK_DIR=$W marks it and everything it
# starts (Flower's SuperExec, ServerApp and ClientApp processes inherit the environment).
start() {
  local name="$1" envs="$2" overrides="$3"; shift 4
  local dir="$W/run/$name" f kv
  mkdir -p "$dir"
  (
    for f in $envs; do load_env "$HERE/env/$f"; done
    for kv in $overrides; do export "${kv?}"; done
    export NEARL_STACK_DIR="$W"
    cd "$dir"
    exec setsid "$@"
  ) >"$LOGS/$name.log" 2>&1 </dev/null &
  names+=("$name"); pids+=("$!")
  say "started $name (pid $!): $* [env: $envs; local overrides: $overrides]"
}

# (explicit return codes: a bare `return` inside the EXIT trap would return the exit status)
pid_of() { local i; for i in "${!names[@]}"; do [[ "${names[$i]}" == "$1" ]] && { echo "${pids[$i]}"; return 0; }; done; return 0; }
alive() { kill -0 "$1" 2>/dev/null && [[ "$(ps -o stat= -p "$1" 2>/dev/null)" != Z* ]]; }
descendants() { local c; for c in $(ps -o pid= --ppid "$1" 2>/dev/null); do echo "$c"; descendants "$c"; done; }
# The pid of the SuperNode process (python -m client.supernode) among $1's descendants (empty when none yet).
supernode_of() {
  local p
  for p in "$1" $(descendants "$1"); do
    [[ "$(ps -ww -o args= -p "$p" 2>/dev/null)" == *client.supernode\ * ]] && { echo "$p"; return 0; }
  done
  return 0
}

# Live processes marked NEARL_STACK_DIR=$W: what this stack started and all they started.
ours() {
  local p
  for p in /proc/[0-9]*; do
    grep -qxzF "NEARL_STACK_DIR=$W" "$p/environ" 2>/dev/null && alive "${p#/proc/}" && echo "${p#/proc/}"
  done
  return 0
}

# stop NAME GRACE: SIGTERM to its process group (and descendants in other sessions), SIGKILL after GRACE s.
stop() {
  local pid; pid="$(pid_of "$1")"
  [[ -n "$pid" ]] || return 0
  local family; family="$(descendants "$pid" | tr '\n' ' ')"
  alive "$pid" || [[ -n "$family" ]] || return 0
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  local waited=0
  while alive "$pid" && (( waited < $2 * 5 )); do sleep 0.2; waited=$((waited + 1)); done
  alive "$pid" && say "$1 did not stop within $2 s of SIGTERM; killing it"
  kill -KILL -- "-$pid" 2>/dev/null || true   # it, and anything left in its process group
  { wait "$pid"; } 2>/dev/null || true
  for p in $family; do alive "$p" && kill -TERM "$p" 2>/dev/null; done
  sleep 0.5
  for p in $family; do alive "$p" && kill -KILL "$p" 2>/dev/null; done
  return 0
}

cleanup() {
  local code=$?
  set +e                     # never stop half-way through stopping things
  (( cleaned )) && return 0
  cleaned=1
  trap - INT TERM
  if (( ${#names[@]} )); then
    say "stopping everything this stack started"
    # (stderr off: bash would report each killed background job)
    stop coordinator 40 2>/dev/null   # first: it stops its SuperLink and the run cleanly
    local name
    for name in "${names[@]}"; do [[ "$name" == site* ]] && stop "$name" 15 2>/dev/null; done
    stop mlflow 15 2>/dev/null
    local left; left="$(ours | tr '\n' ' ')"
    if [[ -n "${left// /}" ]]; then
      say "leftover processes in $W: $left; killing them"
      for p in $left; do kill -KILL "$p" 2>/dev/null || true; done
      sleep 1
      left="$(ours | tr '\n' ' ')"
    fi
    if [[ -n "${left// /}" ]]; then
      say "WARNING: still running: $left"
      (( code == 0 )) && code=1
    else
      say "all processes stopped (none left marked NEARL_STACK_DIR=$W)"
    fi
  fi
  say "work folder kept: $W (logs in $LOGS)"
  exit "$code"
}
trap cleanup EXIT
trap 'say "interrupted"; exit 130' INT
trap 'say "terminated"; exit 143' TERM

fail() {
  say "FAILED: $*"
  local n
  for n in "${names[@]}"; do echo "--- last lines of $LOGS/$n.log ---"; tail -n 15 "$LOGS/$n.log" 2>/dev/null || true; done
  exit 1
}

free_port() { python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# Print the lines of FILE after line $2 (complete lines only); echo the new line count.
follow() {
  local n; n="$(wc -l < "$1")"
  (( n > $2 )) && sed -n "$(($2 + 1)),${n}p" "$1" | sed "s/^/  $3 | /" >&3
  echo "$n"
}

# -- 1. MLflow server (it starts while the secrets and the data are made) ------------------------
say "work folder $W: $sites sites, $rounds rounds"
mlport="$(free_port)"
ml_over="NEARL_MLFLOW_HOST=127.0.0.1 NEARL_MLFLOW_PORT=$mlport NEARL_MLFLOW_WORKERS=1"
ml_over+=" NEARL_MLFLOW_BACKEND_STORE_URI=sqlite:///$W/mlflow/mlflow.db NEARL_MLFLOW_ARTIFACTS_DESTINATION=$W/mlflow/artifacts"
start mlflow "common.env mlflow.env" "$ml_over" -- "$HERE/run/mlflow.sh"

# -- 2. secrets and demo data, as an operator would make them (side by side) -------------------
"$HERE/make-stack-secrets.sh" --out "$W/secrets" --sites "$sites" localhost >"$LOGS/secrets.log" 2>&1 &
secrets_pid=$!
nearl demo-data --out "$W/data" --sites "$sites" --train-per-site "$train_per_site" >"$LOGS/demo-data.log" 2>&1 &
data_pid=$!
wait "$secrets_pid" || { kill "$data_pid" 2>/dev/null; fail "could not make TLS material and site keys (see $LOGS/secrets.log)"; }
say "TLS CA + server certificate in $W/secrets/certs; site keys in $W/secrets/keys; registered: $(ls "$W/secrets/site-keys" | tr '\n' ' ')"
wait "$data_pid" || fail "nearl demo-data failed (see $LOGS/demo-data.log)"
say "demo data: $(ls -d "$W"/data/site* | tr '\n' ' ')"
NEARL_MLFLOW_PORT="$mlport" python "$HERE/docker/healthcheck.py" mlflow --wait 180 \
  || fail "the MLflow server did not become healthy within 180 s"

# -- 3. coordinator -------------------------------------------------------------------------------
port="$(free_port)"
co_over="NEARL_ROUNDS=$rounds NEARL_MIN_SITES=$sites NEARL_HOST=127.0.0.1 NEARL_PORT=$port"
co_over+=" NEARL_CERTS=$W/secrets/certs NEARL_AUTH_KEYS=$W/secrets/site-keys NEARL_MLFLOW_URI=http://127.0.0.1:$mlport"
co_over+=" NEARL_CHECKPOINT_DIR=$W/checkpoints NEARL_WAIT_TIMEOUT=600 NEARL_ROUND_TIMEOUT=900"
start coordinator "common.env coordinator.env" "$co_over" -- "$HERE/run/coordinator.sh"
copid="$(pid_of coordinator)"
printed=0
deadline=$((SECONDS + 300))
until grep -q "submitted" "$LOGS/coordinator.log" 2>/dev/null; do
  alive "$copid" || { printed="$(follow "$LOGS/coordinator.log" "$printed" coordinator)"; fail "the coordinator exited before submitting the run"; }
  (( SECONDS < deadline )) || fail "the coordinator did not submit the run within 300 s"
  sleep 1
done
printed="$(follow "$LOGS/coordinator.log" "$printed" coordinator)"
for p in $(descendants "$copid"); do
  args="$(ps -ww -o args= -p "$p" 2>/dev/null || true)"
  [[ "$args" == *flower-superlink* ]] && say "SuperLink process: ${args#*/bin/}"
done
NEARL_CERTS="$W/secrets/certs" NEARL_PORT="$port" python "$HERE/docker/healthcheck.py" coordinator --wait 60 \
  || fail "the SuperLink's /health did not answer over TLS through the Fleet proxy"

# -- 4. sites -------------------------------------------------------------------------------------
threads=$(( $(nproc) / sites )); (( threads >= 1 )) || threads=1
for ((k = 1; k <= sites; k++)); do
  site="site$k"
  envs="common.env site.env"
  [[ -f "$HERE/env/$site.env" ]] && envs+=" $site.env"
  node_port="$(free_port)"
  si_over="NEARL_SITE=$site NEARL_SERVER=127.0.0.1:$port NEARL_DATA=$W/data/$site NEARL_CERTS=$W/secrets/certs"
  si_over+=" NEARL_AUTH_KEY=$W/secrets/keys/$site NEARL_CLIENT_HOME=$W/sites/$site NEARL_NODE_PORT=$node_port"
  si_over+=" NEARL_THREADS=$threads"  # the sites share this machine's cores
  node_ports[k]="$node_port"
  start "$site" "$envs" "$si_over" -- "$HERE/run/site.sh"
done
for ((k = 1; k <= sites; k++)); do
  site="site$k"; spid="$(pid_of "$site")"; node_port="${node_ports[k]}"
  deadline=$((SECONDS + 240))
  until node="$(supernode_of "$spid")" && [[ -n "$node" ]]; do  # a child of nearl-client (its supervisor)
    alive "$spid" || fail "$site exited before its SuperNode started"
    (( SECONDS < deadline )) || fail "$site did not start its SuperNode within 240 s"
    sleep 1
  done
  NEARL_NODE_PORT="$node_port" python "$HERE/docker/healthcheck.py" site --wait 120 >/dev/null \
    || fail "$site's SuperNode did not answer on 127.0.0.1:$node_port/health"
  args="$(ps -ww -o args= -p "$node")"
  say "$site SuperNode process (healthy): ${args#*/bin/}"
done

# -- 5. the run -----------------------------------------------------------------------------------
say "federation running; coordinator output follows"
deadline=$((SECONDS + timeout_s))
while alive "$copid"; do
  printed="$(follow "$LOGS/coordinator.log" "$printed" coordinator)"
  (( SECONDS < deadline )) || fail "the federation did not finish within ${timeout_s} s"
  for ((k = 1; k <= sites; k++)); do
    alive "$(pid_of "site$k")" || say "WARNING: site$k stopped (see $LOGS/site$k.log)"
  done
  sleep 2
done
set +e
wait "$copid"
rc=$?
set -e
printed="$(follow "$LOGS/coordinator.log" "$printed" coordinator)"
say "coordinator exited with code $rc"

# The sites stay connected until stopped; the run is over.
for ((k = 1; k <= sites; k++)); do stop "site$k" 15 2>/dev/null; done

if (( rc == 0 )); then
  python - "http://127.0.0.1:$mlport" <<'PY' || say "WARNING: could not read the run back from MLflow"
import sys
from mlflow.tracking import MlflowClient

client = MlflowClient(tracking_uri=sys.argv[1])
exp = client.get_experiment_by_name("nearl-federated")
run = client.search_runs([exp.experiment_id], order_by=["attribute.start_time DESC"], max_results=1)[0]
rid = run.info.run_id
loss = {m.step: m.value for m in client.get_metric_history(rid, "train_loss")}
acc = {m.step: m.value for m in client.get_metric_history(rid, "eval_accuracy")}
print(f"[local-stack.sh] MLflow run {rid} ({run.info.status}): train_loss by round "
      + ", ".join(f"{s}: {v:.3f}" for s, v in sorted(loss.items()))
      + "; eval_accuracy by step " + ", ".join(f"{s}: {v:.3f}" for s, v in sorted(acc.items())))
PY
fi

if (( keep_mlflow )); then
  trap 'say "stopping the MLflow server"; exit "$rc"' INT TERM
  say "MLflow UI: http://127.0.0.1:$mlport (experiment nearl-federated); press Ctrl-C to stop it"
  while alive "$(pid_of mlflow)"; do sleep 2; done
  say "the MLflow server stopped"
else
  say "MLflow UI was at http://127.0.0.1:$mlport during the run; to browse it again:"
  say "  mlflow ui --backend-store-uri sqlite:///$W/mlflow/mlflow.db --port 5000   # then http://127.0.0.1:5000"
fi
say "checkpoints: $W/checkpoints (final adapters in $W/checkpoints/final)"
exit "$rc"
