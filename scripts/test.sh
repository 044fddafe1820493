#!/usr/bin/env bash
# Install visionserve with the extras the tests need (export, smp, test, tensorrt-rtx, ray)
# into ./.venv and run the tests.
# Extra arguments go to pytest (e.g. -m "not slow", -k iou).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -c constraints.txt -e '.[export,smp,test,tensorrt-rtx,ray]'
# tritonclient's metadata pins protobuf<7 (it works on 7): install it without dependencies.
.venv/bin/pip install -q -c constraints.txt --no-deps tritonclient python-rapidjson
exec .venv/bin/pytest "$@"
