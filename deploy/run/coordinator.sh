#!/usr/bin/env bash
# Start the NEARL coordinator (nearl-server: Flower SuperLink + ServerApp) from NEARL_*
# variables, as set by deploy/env/common.env + deploy/env/coordinator.env. The container
# image, deploy/compose.yaml, deploy/k8s and deploy/local-stack.sh all start it this way.
# TLS and SuperNode authentication are always on; extra arguments go to nearl-server.
set -euo pipefail
die() { echo "coordinator.sh: $*" >&2; exit 2; }

certs="${NEARL_CERTS:-/run/nearl/certs}"
keys="${NEARL_AUTH_KEYS:-/run/nearl/site-keys}"
ckpt="${NEARL_CHECKPOINT_DIR:-/var/lib/nearl/checkpoints}"
[[ -f "$certs/server.pem" && -f "$certs/server.key" && -f "$certs/ca.crt" ]] \
  || die "NEARL_CERTS=$certs lacks ca.crt/server.pem/server.key; make them with deploy/make-certs.sh HOST"
compgen -G "$keys/*.pub" >/dev/null \
  || die "NEARL_AUTH_KEYS=$keys holds no site public key (*.pub); collect them from the sites (deploy/make-site-key.sh)"

args=(--host "${NEARL_HOST:-0.0.0.0}" --port "${NEARL_PORT:-9092}"
      --certs "$certs" --auth-keys "$keys"
      --mlflow-uri "${NEARL_MLFLOW_URI:-http://mlflow:5000}" --experiment "${NEARL_EXPERIMENT:-nearl-federated}"
      --checkpoint-dir "$ckpt")
if [[ -n "${NEARL_ROSTER:-}" ]]; then
  [[ -f "$NEARL_ROSTER" ]] || die "NEARL_ROSTER=$NEARL_ROSTER not found; mount the consortium's roster.json (deploy/make-roster.sh)"
  args+=(--roster "$NEARL_ROSTER")
fi
# The federation's settings and the public port's limits: a flag only for a variable that is set, so
# nearl-server's one definition of each default decides the rest.
for pair in NEARL_ROUNDS:--rounds NEARL_CONFIG:--config NEARL_STRATEGY:--strategy NEARL_MIN_SITES:--min-sites \
            NEARL_LOCAL_EPOCHS:--local-epochs NEARL_WAIT_TIMEOUT:--wait-timeout NEARL_ROUND_TIMEOUT:--round-timeout \
            NEARL_MAX_BODY_MB:--max-body-mb NEARL_RATE_LIMIT:--rate-limit NEARL_MAX_CONNECTIONS:--max-connections; do
  var="${pair%%:*}"
  if [[ -n "${!var:-}" ]]; then args+=("${pair#*:}" "${!var}"); fi
done
read -ra overrides <<< "${NEARL_SET:-}"
for item in "${overrides[@]}"; do args+=(--set "$item"); done
case "${NEARL_RESUME:-auto}" in
  auto) if compgen -G "$ckpt/round-[0-9]*" >/dev/null; then args+=(--resume "$ckpt"); fi ;;
  true|yes|1) args+=(--resume "$ckpt") ;;
  false|no|0|"") ;;
  *) die "NEARL_RESUME=${NEARL_RESUME}: use auto, true or false" ;;
esac
echo "coordinator.sh: nearl-server ${args[*]} $*"
exec nearl-server "${args[@]}" "$@"
