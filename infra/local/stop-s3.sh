#!/usr/bin/env bash
# Stop the S3 endpoint started by start-s3.sh with the same DIR (only the recorded pid).
set -euo pipefail
[[ $# -eq 1 ]] || { echo "usage: $0 DIR" >&2; exit 2; }
source "$(dirname "$0")/_python.sh"
exec "$PY" -m pipeline.cluster.localhead stop-s3 --dir "$1"
