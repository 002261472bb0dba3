#!/usr/bin/env bash
# Serve the project's MLflow store (the one the jobs write by default) over HTTP, so several nodes, or
# concurrent trials, can share it:   bash mlflow/server.sh [PORT]
# Then point jobs at it:             export MLFLOW_TRACKING_URI=http://127.0.0.1:${PORT:-5000}
# For other nodes, listen on this machine's private address (cluster.yaml does so on the head), never
# on all addresses of a public host:  HOST=10.0.1.23 bash mlflow/server.sh
# Only to browse the local store:    mlflow ui --backend-store-uri sqlite:///$PWD/mlflow/store/mlflow.db
set -euo pipefail
store="$(cd "$(dirname "$0")" && pwd)/store"
mkdir -p "$store/artifacts"
export MLFLOW_DISABLE_TELEMETRY=true
exec mlflow server \
  --backend-store-uri "sqlite:///$store/mlflow.db" \
  --artifacts-destination "$store/artifacts" \
  --host "${HOST:-127.0.0.1}" --port "${1:-5000}" --workers 1
