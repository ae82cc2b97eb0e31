#!/usr/bin/env bash
# Start a local Ray head on 127.0.0.1 (free ports, temp dir and pid record under DIR, token auth by default).
# Usage: infra/local/start-head.sh DIR [--num-cpus N] [--num-gpus N] [--resources '{"crf": 2}'] [--auth-mode disabled]
# Then:  deeplab submit --address <dashboard> --token-file DIR/auth_token segment -- ...
set -euo pipefail
[[ $# -ge 1 ]] || { echo "usage: $0 DIR [options]" >&2; exit 2; }
source "$(dirname "$0")/_python.sh"
dir="$1"; shift
exec "$PY" -m pipeline.cluster.localhead start-head --dir "$dir" "$@"
