#!/usr/bin/env bash
# Make the consortium roster: every site's SuperNode public key, pinned by every site.
#
#   deploy/make-roster.sh --out roster.json --ca ca.crt [--force] SITE.pub [SITE.pub...]
#
# Each SITE.pub is a site's public key (deploy/make-site-key.sh SITE); its file name (without
# .pub) is the site's name. ca.crt is the federation CA (deploy/make-certs.sh). Writes
# roster.json (site -> key and fingerprint, plus the CA's fingerprint) and prints its sha256:
# give every site and the coordinator the same file (nearl-client --roster, nearl-server
# --roster) and compare that digest with each of them by a second channel (phone, letter).
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then sed -n '2,10p' "$0"; exit 0; fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${NEARL_PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$here/.venv/bin/python" ]]; then python="$here/.venv/bin/python"; else python="python3"; fi
fi
PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" exec "$python" -m nearl_protocol.roster "$@"
