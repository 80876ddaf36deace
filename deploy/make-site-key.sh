#!/usr/bin/env bash
# Make a site's SuperNode authentication key pair (ECDSA P-384, the type Flower requires).
#
#   deploy/make-site-key.sh [--out DIR] SITE
#
# Writes DIR/SITE (private key: stays at the site, passed as nearl-client --auth-key) and
# DIR/SITE.pub (public key: send it to the coordinator, who puts it in the folder given to
# nearl-server --auth-keys). DIR defaults to deploy/secrets/keys (ignored by git).
set -euo pipefail
out="deploy/secrets/keys"
site=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    -*) echo "make-site-key.sh: unknown option $1" >&2; exit 2 ;;
    *) site="$1"; shift ;;
  esac
done
[[ -n "$site" ]] || { echo "make-site-key.sh: give the site name, e.g. make-site-key.sh siteA" >&2; exit 2; }
[[ "$site" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$ ]] || { echo "make-site-key.sh: bad site name '$site'" >&2; exit 2; }
command -v ssh-keygen >/dev/null || { echo "make-site-key.sh: ssh-keygen not found (openssh-client)" >&2; exit 2; }
mkdir -p "$out"
if [[ -e "$out/$site" ]]; then echo "make-site-key.sh: $out/$site already exists; keep it or delete it first" >&2; exit 2; fi
ssh-keygen -q -t ecdsa -b 384 -N "" -C "nearl-site-$site" -f "$out/$site"
echo "wrote $out/$site (private: stays at the site) and $out/$site.pub (public: give it to the coordinator)"
