#!/usr/bin/env bash
# Set up this repository on a fresh Debian machine with Python 3.11; safe to run again.
#   1. Debian's dataset-fashion-mnist (the real data every learning claim here uses)
#   2. .venv/ with torch 2.14.1 + torchvision 0.29.1, JAX/Flax/optax/Orbax/TFDS (CPU builds),
#      matplotlib and tensorboard, and this project (editable, with test tools: pytest,
#      hypothesis, torch-lr-finder)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null \
    || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null; }
fi

PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[flax,test]"
