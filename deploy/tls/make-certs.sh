#!/usr/bin/env bash
# Generate a private CA and one certificate it signs, for Dask's TLS.
#
#   deploy/tls/make-certs.sh DIR [EXTRA_DNS_NAME ...]
#
# Writes DIR/ca.pem, DIR/ca.key (keep private), DIR/node.pem and DIR/node.key.
# The node certificate is valid for localhost, 127.0.0.1 and every extra
# name given (e.g. "scheduler" in docker compose, or the scheduler's service
# name in Kubernetes). Scheduler, workers and clients all present it: Dask's
# TLS authenticates peers by the CA, so one certificate for the whole
# cluster is enough. Use separate ones if your policy needs per-role keys.
set -euo pipefail

if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
dir="$1"; shift
days="${CERT_DAYS:-365}"
if [[ -e "$dir/ca.pem" || -e "$dir/node.pem" ]]; then
    echo "error: $dir already holds certificates; remove them first" >&2
    exit 2
fi
mkdir -p "$dir"
umask 077

san="DNS:localhost,IP:127.0.0.1"
for name in "$@"; do
    san="$san,DNS:$name"
done

openssl req -x509 -newkey rsa:3072 -nodes -days "$days" \
    -subj "/CN=dask-labelissues CA" -keyout "$dir/ca.key" -out "$dir/ca.pem" 2>/dev/null
openssl req -newkey rsa:3072 -nodes -subj "/CN=dask-labelissues node" \
    -keyout "$dir/node.key" -out "$dir/node.csr" 2>/dev/null
printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\n' "$san" > "$dir/node.ext"
openssl x509 -req -in "$dir/node.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
    -CAcreateserial -days "$days" -extfile "$dir/node.ext" -out "$dir/node.pem" 2>/dev/null
rm -f "$dir/node.csr" "$dir/node.ext" "$dir/ca.srl"
chmod 644 "$dir/ca.pem" "$dir/node.pem"
echo "wrote $dir/ca.pem $dir/node.pem $dir/node.key (valid for $san, $days days)"
