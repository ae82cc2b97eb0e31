#!/usr/bin/env bash
# Stop the head started by start-head.sh with the same DIR: only the processes recorded in DIR/head.json.
set -euo pipefail
[[ $# -eq 1 ]] || { echo "usage: $0 DIR" >&2; exit 2; }
source "$(dirname "$0")/_python.sh"
exec "$PY" -m pipeline.cluster.localhead stop-head --dir "$1"
