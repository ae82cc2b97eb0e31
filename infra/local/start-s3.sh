#!/usr/bin/env bash
# Start a local S3 endpoint (moto server on 127.0.0.1, free port); pid and endpoint recorded in DIR/s3.json.
# moto accepts any credentials: use the placeholders of LOCAL_S3_ENV in pipeline/cluster/services.py, and
# AWS_ENDPOINT_URL=<printed endpoint> (or --endpoint-url) for the clients.
set -euo pipefail
[[ $# -eq 1 ]] || { echo "usage: $0 DIR" >&2; exit 2; }
source "$(dirname "$0")/_python.sh"
exec "$PY" -m pipeline.cluster.localhead start-s3 --dir "$1"
