#!/usr/bin/env bash
# compose's `setup` service (once, and again after an upgrade of the image): the project folder in the shared
# volume (the image's copy of the repository, kept when it is there already), its DVC remote in MinIO, the
# work pools (process workers, the job template of infra/process-job-template.json) and the deployments of
# prefect.yaml, whose project folder is /srv/project.
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
for pool in cpu gpu; do
  prefect work-pool create "$pool" --type process --base-job-template infra/process-job-template.json --overwrite
done
prefect work-pool set-concurrency-limit gpu 1  # one run per GPU
prefect --no-prompt deploy --all
