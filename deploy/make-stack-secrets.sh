#!/usr/bin/env bash
# Make everything deploy/compose.yaml (or deploy/local-stack.sh) mounts from a secrets folder:
#
#   deploy/make-stack-secrets.sh [--out DIR] [--sites N] [HOST...]
#
#   DIR/certs/        ca.crt, ca.key, server.pem, server.key   (deploy/make-certs.sh HOST... coordinator)
#   DIR/keys/siteK    siteK's private key, DIR/keys/siteK.pub  (deploy/make-site-key.sh siteK)
#   DIR/site-keys/    the public keys the coordinator registers (nearl-server --auth-keys)
#
# DIR defaults to deploy/secrets (ignored by git); N to 2 (site1, site2). The server
# certificate covers "coordinator" (the compose service name), every HOST given, localhost,
# 127.0.0.1 and ::1. Existing certificates and keys are kept, never overwritten.
# This is the all-in-one-machine demo: in a real federation each hospital makes its own key
# with make-site-key.sh and sends only the .pub file (docs/deployment.md).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="$here/secrets"
sites=2
hosts=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --sites) sites="$2"; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    -*) echo "make-stack-secrets.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) hosts+=("$1"); shift ;;
  esac
done
[[ "$sites" =~ ^[1-9][0-9]*$ ]] || { echo "make-stack-secrets.sh: --sites $sites: give a positive number" >&2; exit 2; }

if [[ -e "$out/certs/ca.key" ]]; then
  echo "keeping the certificates in $out/certs"
else
  "$here/make-certs.sh" --out "$out/certs" coordinator "${hosts[@]}"
fi
mkdir -p "$out/site-keys"
for ((k = 1; k <= sites; k++)); do
  site="site$k"
  if [[ -e "$out/keys/$site" ]]; then
    echo "keeping $out/keys/$site"
  else
    "$here/make-site-key.sh" --out "$out/keys" "$site"
  fi
  cp "$out/keys/$site.pub" "$out/site-keys/$site.pub"
done
echo "registered public keys for the coordinator: $(cd "$out/site-keys" && echo *.pub)"
