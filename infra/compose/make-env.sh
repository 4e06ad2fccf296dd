#!/usr/bin/env bash
# infra/.env with a fresh random value for every credential compose asks for (mode 600; ignored by git and
# Docker). Refuses to overwrite an existing file: to rotate one credential, edit its line (infra/README.md says
# what else to run).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
env_file=${1:-$here/../.env}
if [[ -e $env_file ]]; then
  echo "make-env: $env_file exists; edit it to change a value" >&2
  exit 1
fi
random() { python3 -c 'import secrets; print(secrets.token_urlsafe(24))'; }
umask 077
{
  echo "POSTGRES_PASSWORD=$(random)"
  echo "PREFECT_DB_PASSWORD=$(random)"
  echo "MLFLOW_DB_PASSWORD=$(random)"
  echo "MINIO_ROOT_USER=minio-root"
  echo "MINIO_ROOT_PASSWORD=$(random)"
  echo "S3_MLFLOW_SECRET=$(random)"
  echo "S3_PIPELINE_SECRET=$(random)"
  echo "S3_DASK_SECRET=$(random)"
  echo "PREFECT_AUTH_STRING=admin:$(random)"
  echo "MLFLOW_ADMIN_PASSWORD=$(random)"
  echo "MLFLOW_PIPELINE_PASSWORD=$(random)"
  echo "MLFLOW_SECRET_KEY=$(python3 -c 'import secrets; print(secrets.token_hex(32))')"
  echo "INFLUENCE_STORE_KEY=$(python3 -c 'import secrets; print(secrets.token_hex(32))')"
} >"$env_file"
echo "make-env: wrote $env_file"
