#!/usr/bin/env bash
# MLflow tracking server for runs on a cluster: run metadata in a database, artifacts (reconstruction
# grids, comparison plots, tables) in GCS, proxied by the server so clients need no GCS credentials.
#
#   MLFLOW_ARTIFACTS_DESTINATION=gs://BUCKET/mlflow bash infra/mlflow/server.sh
#   c2f train-tokenizer --config configs/demo.yaml --set tracking.uri=http://HOST:5000
#
# Environment (defaults in brackets):
#   MLFLOW_BACKEND_URI            SQLAlchemy URI of the run store [postgresql://mlflow:mlflow@localhost:5432/mlflow];
#                                 PostgreSQL needs `pip install psycopg2-binary` (the infra/Dockerfile image has it)
#   MLFLOW_ARTIFACTS_DESTINATION  where artifacts go, e.g. gs://BUCKET/mlflow [required]; the server's
#                                 Google credentials need write access there
#   MLFLOW_HOST / MLFLOW_PORT     bind address [0.0.0.0] and port [5000]
#   MLFLOW_WORKERS                server worker processes [4]
#   MLFLOW_ALLOWED_HOSTS          Host headers accepted. MLflow 3 only accepts localhost and private IPs by
#                                 default, so a Kubernetes Service name such as `mlflow` must be listed
#                                 [localhost, 127.0.0.1, mlflow, mlflow.<namespace>.svc.cluster.local, private IPs]
set -euo pipefail

backend_uri="${MLFLOW_BACKEND_URI:-postgresql://mlflow:mlflow@localhost:5432/mlflow}"
artifacts="${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION, e.g. gs://BUCKET/mlflow}"
host="${MLFLOW_HOST:-0.0.0.0}"
port="${MLFLOW_PORT:-5000}"
workers="${MLFLOW_WORKERS:-4}"
allowed_hosts="${MLFLOW_ALLOWED_HOSTS:-localhost,localhost:*,127.0.0.1,127.0.0.1:*,mlflow,mlflow:*,mlflow.*.svc.cluster.local,mlflow.*.svc.cluster.local:*,10.*,172.*,192.168.*}"

exec mlflow server \
    --backend-store-uri "$backend_uri" \
    --serve-artifacts \
    --artifacts-destination "$artifacts" \
    --host "$host" \
    --port "$port" \
    --workers "$workers" \
    --allowed-hosts "$allowed_hosts"
