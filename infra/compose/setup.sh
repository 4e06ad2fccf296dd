#!/usr/bin/env bash
# compose's `setup` service (once, and again after an upgrade of the image or a new MLFLOW_PIPELINE_PASSWORD):
# the project folder in the shared volume (the image's copy of the repository, kept when it is there already),
# its DVC remote in MinIO, MLflow's user `pipeline` of the flow runs (infra/mlflow-users.py: EDIT on the
# pipeline's experiment only), the work pools (process workers, the job template of
# infra/process-job-template.json) and the deployments of prefect.yaml, whose project folder is /srv/project.
set -euo pipefail
if [[ ! -f /srv/project/params.yaml ]]; then
  cp -a /opt/influence/project/. /srv/project/
fi
cd /srv/project
if ! git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git init -q && git add -A && git -c user.name=setup -c user.email=setup@localhost commit -qm "initial import"
fi
dvc remote add --force --default store s3://dvc
dvc remote modify store endpointurl "$AWS_ENDPOINT_URL"
python /opt/influence/project/infra/mlflow-users.py params.yaml
# the credentials of a docker pool's flow runs (infra/work-pools/docker.json mounts this volume read-only):
# MLflow's credentials file, an AWS shared credentials file and the object store's signing key
(
  umask 077
  cd /home/influence/.mlflow
  printf '[mlflow]\nmlflow_tracking_username = %s\nmlflow_tracking_password = %s\n' "$MLFLOW_PIPELINE_USER" \
    "$MLFLOW_PIPELINE_PASSWORD" >credentials
  printf '[default]\naws_access_key_id = pipeline\naws_secret_access_key = %s\n' "$S3_PIPELINE_SECRET" >aws-credentials
  printf '%s\n' "$INFLUENCE_STORE_KEY" >store-key
)
for pool in cpu gpu; do
  prefect work-pool create "$pool" --type process --base-job-template infra/process-job-template.json --overwrite
done
prefect work-pool set-concurrency-limit gpu 1  # one run per GPU
prefect --no-prompt deploy --all
