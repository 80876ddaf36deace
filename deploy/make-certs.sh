#!/usr/bin/env bash
# Make a private CA and a server certificate for the NEARL coordinator (Flower SuperLink).
#
#   deploy/make-certs.sh [--out DIR] [--days N] HOST [HOST...]
#
# HOST values become the certificate's subjectAltNames: give every name or IP address
# that hospitals will type after --server (e.g. fl.example-hospital.org 10.0.0.5).
# 127.0.0.1, ::1 and localhost are always included so the coordinator can reach itself.
#
# Writes into DIR (default deploy/secrets/certs, ignored by git):
#   ca.crt      public CA certificate: copy it to every site (nearl-client --certs DIR)
#   ca.key      CA private key: keep it offline, never copy it anywhere
#   server.pem  server certificate, server.key its private key: stay on the coordinator
# Refuses to overwrite an existing CA; delete DIR first to start over.
set -euo pipefail

out="deploy/secrets/certs"
days=825
hosts=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --days) days="$2"; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    -*) echo "make-certs.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) hosts+=("$1"); shift ;;
  esac
done
if [[ ${#hosts[@]} -eq 0 ]]; then
  echo "make-certs.sh: give the server's host name or IP address, e.g. make-certs.sh fl.hospital.org" >&2
  exit 2
fi
command -v openssl >/dev/null || { echo "make-certs.sh: openssl not found; install it first" >&2; exit 2; }
if [[ -e "$out/ca.key" ]]; then
  echo "make-certs.sh: $out/ca.key already exists; remove $out to make new certificates" >&2
  exit 2
fi
mkdir -p "$out"
chmod 700 "$out"

# subjectAltName list: DNS names and IP addresses, always with the loopback names
san=""; dns_i=0; ip_i=0
add_san() {
  if [[ "$1" =~ ^[0-9.]+$ || "$1" == *:* ]]; then ip_i=$((ip_i + 1)); san+="IP.$ip_i = $1"$'\n'
  else dns_i=$((dns_i + 1)); san+="DNS.$dns_i = $1"$'\n'; fi
}
for h in "${hosts[@]}" localhost 127.0.0.1 ::1; do add_san "$h"; done

cat > "$out/server.cnf" <<CNF
[req]
distinguished_name = dn
prompt = no
[dn]
CN = ${hosts[0]}
O = NEARL federation
[ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = @alt
[alt]
$san
CNF

umask 077
openssl genrsa -out "$out/ca.key" 4096 2>/dev/null
openssl req -x509 -new -key "$out/ca.key" -sha256 -days "$days" -subj "/CN=NEARL federation CA/O=NEARL federation" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" -out "$out/ca.crt"
openssl genrsa -out "$out/server.key" 4096 2>/dev/null
openssl req -new -key "$out/server.key" -config "$out/server.cnf" -out "$out/server.csr"
openssl x509 -req -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial -days "$days" \
  -sha256 -extfile "$out/server.cnf" -extensions ext -out "$out/server.pem" 2>/dev/null
rm -f "$out/server.csr" "$out/ca.srl"
chmod 644 "$out/ca.crt" "$out/server.pem"
openssl verify -CAfile "$out/ca.crt" "$out/server.pem" >/dev/null

echo "wrote $out: ca.crt (copy to every site), server.pem + server.key (coordinator only), ca.key (keep offline)"
echo "subjectAltNames: $(echo "$san" | sed 's/.* = //' | tr '\n' ' ')"
