#!/bin/sh
# compose's `buckets` service (MinIO's client mc, with the root key in MC_HOST_store): the buckets, and one MinIO
# user per client with read and write access to its own buckets only:
#   mlflow    the MLflow server's artifacts      bucket mlflow
#   pipeline  the flow runs (DVC remote, stages)  buckets dvc, stages
#   dask      the Dask workers' stage outputs     bucket stages
# Run again (docker compose up buckets) after changing a secret in infra/.env: it sets the new one. Secrets reach
# mc on its standard input, never as arguments.
set -eu

mc mb --ignore-existing store/mlflow store/dvc store/stages

policy() {  # policy FILE BUCKET...: read and write objects of these buckets, nothing else
  file=$1
  shift
  resources=""
  for bucket in "$@"; do
    resources="$resources\"arn:aws:s3:::$bucket\",\"arn:aws:s3:::$bucket/*\","
  done
  cat >"$file" <<EOF
{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": ["s3:GetBucketLocation", "s3:ListBucket",
 "s3:ListBucketMultipartUploads", "s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload",
 "s3:ListMultipartUploadParts"], "Resource": [${resources%,}]}]}
EOF
}

user() {  # user NAME SECRET BUCKET...
  name=$1
  secret=$2
  shift 2
  [ "${#secret}" -ge 8 ] || { echo "buckets: the secret of MinIO user $name needs 8 characters or more" >&2; exit 1; }
  policy "/tmp/$name.json" "$@"
  mc admin policy create store "$name-rw" "/tmp/$name.json" >/dev/null
  printf '%s\n' "$secret" | mc admin user add store "$name" >/dev/null  # creates it, or sets its new secret
  mc admin policy attach store "$name-rw" --user "$name" >/dev/null 2>&1 \
    || mc admin user info store "$name" | grep -q "$name-rw" \
    || { echo "buckets: could not give MinIO user $name its policy" >&2; exit 1; }
  echo "buckets: MinIO user $name: $*"
}

user mlflow "$S3_MLFLOW_SECRET" mlflow
user pipeline "$S3_PIPELINE_SECRET" dvc stages
user dask "$S3_DASK_SECRET" stages
