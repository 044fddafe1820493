#!/usr/bin/env bash
# Install visionserve into ./.venv and run the whole demo end to end:
# generate data -> train -> export -> serve -> segment + classify -> IoU table -> stop.
# Extra arguments go to `visionserve demo` (e.g. --workdir DIR, --quick).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -c constraints.txt -e '.[export]'
exec .venv/bin/visionserve demo "$@"
