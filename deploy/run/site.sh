#!/usr/bin/env bash
# Start a NEARL hospital site (nearl-client: data check, then a Flower SuperNode) from
# NEARL_* variables, as set by deploy/env/common.env + deploy/env/site.env + the site's own
# file (deploy/env/site1.env, ...). The site container (deploy/compose.yaml), deploy/local-stack.sh
# and deploy/systemd/nearl-client@.service all start a site this way. TLS and
# SuperNode authentication are always on; extra arguments go to nearl-client. The site exits 69 after
# NEARL_CONNECT_TIMEOUT seconds without its coordinator, for its service manager to start it again.
set -euo pipefail
die() { echo "site.sh: $*" >&2; exit 2; }

[[ -n "${NEARL_SITE:-}" ]] || die "set NEARL_SITE (the site's short name, e.g. siteA) in the site's env file"
[[ -n "${NEARL_SERVER:-}" ]] || die "set NEARL_SERVER to the coordinator's host:port, e.g. fl.example.org:9092"
certs="${NEARL_CERTS:-/run/nearl/certs}"
key="${NEARL_AUTH_KEY:-/run/nearl/site-key}"
[[ -f "$certs/ca.crt" ]] || die "NEARL_CERTS=$certs has no ca.crt; copy the federation's ca.crt from the coordinator"
[[ -f "$key" ]] || die "NEARL_AUTH_KEY=$key not found; make the site key with deploy/make-site-key.sh $NEARL_SITE"

args=(--site "$NEARL_SITE" --data "${NEARL_DATA:-/data}" --server "$NEARL_SERVER" --config "${NEARL_CONFIG:-demo}"
      --certs "$certs" --auth-key "$key")
[[ -n "${NEARL_NODE_PORT:-}" ]] && args+=(--port "$NEARL_NODE_PORT")
[[ -n "${NEARL_DEVICE:-}" && "${NEARL_DEVICE}" != auto ]] && args+=(--device "$NEARL_DEVICE")
[[ -n "${NEARL_PRETRAINED:-}" ]] && args+=(--pretrained "$NEARL_PRETRAINED")
[[ -n "${NEARL_MAX_EPSILON:-}" ]] && args+=(--max-epsilon "$NEARL_MAX_EPSILON")
if [[ -n "${NEARL_ROSTER:-}" ]]; then
  [[ -f "$NEARL_ROSTER" ]] || die "NEARL_ROSTER=$NEARL_ROSTER not found; mount the consortium's roster.json (deploy/make-roster.sh)"
  args+=(--roster "$NEARL_ROSTER")
fi
[[ -n "${NEARL_MIN_SECURE_SITES:-}" ]] && args+=(--min-secure-sites "$NEARL_MIN_SECURE_SITES")
[[ -n "${NEARL_THREADS:-}" ]] && args+=(--threads "$NEARL_THREADS")
[[ -n "${NEARL_CONNECT_TIMEOUT:-}" ]] && args+=(--connect-timeout "$NEARL_CONNECT_TIMEOUT")
for fab in ${NEARL_ACCEPT_FAB:-}; do args+=(--accept-fab "$fab"); done
[[ "${NEARL_COLD:-}" == 1 ]] && args+=(--cold)
[[ -n "${NEARL_POLICY:-}" ]] && args+=(--policy "$NEARL_POLICY")
export NEARL_CLIENT_HOME="${NEARL_CLIENT_HOME:-/var/lib/nearl/site}"
echo "site.sh: nearl-client ${args[*]} $* (state in $NEARL_CLIENT_HOME)"
exec nearl-client "${args[@]}" "$@"
