#!/usr/bin/env bash
# The Dask cluster's mutual-TLS material: a private CA and one certificate per role (scheduler, worker, client),
# written to infra/certs/dask/ (ignored by git and Docker). Every Dask connection then needs a certificate of
# this CA on both sides; a process without one is refused.
#
#   infra/compose/make-certs.sh            # once; refuses to overwrite existing material
#   infra/compose/make-certs.sh --rotate   # new leaf certificates and keys from the same CA (then restart Dask
#                                          # and the Prefect workers: docker compose up -d --force-recreate)
#
# Kubernetes: the same files become the secret dask-tls (infra/kubernetes/README.md).
# Environment: DASK_CERTS_DIR (default infra/certs/dask), DASK_CERT_DAYS (default 365), DASK_CERT_UID (default
# 1000, the image's user: when run as root the keys are given to it).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=${DASK_CERTS_DIR:-$here/../certs/dask}
days=${DASK_CERT_DAYS:-365}
owner=${DASK_CERT_UID:-1000}
rotate=false
case ${1:-} in
  "") ;;
  --rotate) rotate=true ;;
  *) echo "usage: $0 [--rotate]" >&2; exit 2 ;;
esac
command -v openssl >/dev/null || { echo "make-certs: openssl is not installed" >&2; exit 1; }

umask 077
mkdir -p "$out"
chmod 700 "$out"
cd "$out"
if [[ -e ca.pem && $rotate == false ]]; then
  echo "make-certs: $out already holds a CA; pass --rotate for new leaf certificates" >&2
  exit 1
fi
if [[ ! -e ca.pem ]]; then
  openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 -days 3650 \
    -subj "/CN=influence-platform dask CA" -keyout ca.key -out ca.pem \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi
for role in scheduler worker client; do
  rm -f "$role.key" "$role.pem"
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 \
    -subj "/CN=dask-$role" -keyout "$role.key" -out "$role.csr" 2>/dev/null
  # workers are servers (to the scheduler and each other) and clients; every leaf may do both
  printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
    "extendedKeyUsage=serverAuth,clientAuth" "subjectAltName=DNS:dask-$role,DNS:dask-scheduler,DNS:localhost" >"$role.ext"
  openssl x509 -req -sha256 -days "$days" -in "$role.csr" -CA ca.pem -CAkey ca.key -CAcreateserial \
    -extfile "$role.ext" -out "$role.pem" 2>/dev/null
  rm -f "$role.csr" "$role.ext"
done
rm -f ca.srl
chmod 644 ca.pem scheduler.pem worker.pem client.pem
chmod 600 ca.key
if [[ $(id -u) == 0 ]]; then
  chown "$owner:$owner" scheduler.key worker.key client.key
  chmod 400 scheduler.key worker.key client.key
elif [[ $(id -u) == "$owner" ]]; then
  chmod 400 scheduler.key worker.key client.key
else
  # compose mounts each file into its container as it is, so the containers' user must be able to read the
  # keys: they stay protected on this machine by the folder's mode 700
  chmod 444 scheduler.key worker.key client.key
  echo "make-certs: run as root (or as uid $owner) to give the keys to the containers' user only" >&2
fi
echo "make-certs: CA and scheduler, worker and client certificates in $out (valid $days days)"
