#!/usr/bin/env bash
# Start the shared MLflow tracking server from NEARL_MLFLOW_* variables (deploy/env/mlflow.env).
# The compose stack, deploy/k8s and deploy/local-stack.sh all start it this way.
# A "{password}" in NEARL_MLFLOW_BACKEND_STORE_URI is replaced by the URL-quoted contents of
# NEARL_MLFLOW_DB_PASSWORD_FILE, so a database password never sits in an env file.
set -euo pipefail
die() { echo "mlflow.sh: $*" >&2; exit 2; }

uri="${NEARL_MLFLOW_BACKEND_STORE_URI:-sqlite:////var/lib/mlflow/mlflow.db}"
artifacts="${NEARL_MLFLOW_ARTIFACTS_DESTINATION:-/var/lib/mlflow/artifacts}"
shown="$uri"
if [[ "$uri" == *"{password}"* ]]; then
  pwfile="${NEARL_MLFLOW_DB_PASSWORD_FILE:-}"
  [[ -n "$pwfile" && -r "$pwfile" ]] || die "the store URI has {password}: set NEARL_MLFLOW_DB_PASSWORD_FILE to a readable file"
  pw="$(python -c 'import sys, urllib.parse; print(urllib.parse.quote(open(sys.argv[1]).read().strip(), safe=""))' "$pwfile")"
  uri="${uri//\{password\}/$pw}"
fi
if [[ "$uri" == sqlite:///* ]]; then mkdir -p "$(dirname "${uri#sqlite:///}")"; fi
case "$artifacts" in *://*) ;; *) mkdir -p "$artifacts" ;; esac
args=(--host "${NEARL_MLFLOW_HOST:-0.0.0.0}" --port "${NEARL_MLFLOW_PORT:-5000}"
      --workers "${NEARL_MLFLOW_WORKERS:-2}" --artifacts-destination "$artifacts")
[[ -n "${NEARL_MLFLOW_ALLOWED_HOSTS:-}" ]] && args+=(--allowed-hosts "$NEARL_MLFLOW_ALLOWED_HOSTS")
echo "mlflow.sh: mlflow server --backend-store-uri $shown ${args[*]} $*"
exec mlflow server --backend-store-uri "$uri" "${args[@]}" "$@"
