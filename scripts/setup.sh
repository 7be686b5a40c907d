#!/usr/bin/env bash
# Set up this repository on a fresh Debian machine with Python 3.11; safe to run again.
#   1. Debian's dataset-fashion-mnist (the real data every learning claim here uses), and
#      chromium + chromium-driver (the demo's browser test)
#   2. .venv/ with torch 2.14.1 + torchvision 0.29.1, JAX/Flax/optax/Orbax/TFDS (CPU builds),
#      matplotlib and tensorboard, and this project (editable, with test tools: pytest,
#      hypothesis, torch-lr-finder; the ONNX export's onnx, onnxruntime, onnxscript; the demo's
#      gradio, gradio_client, selenium)
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
apt_install() {  # Debian packages, once: the lists are refreshed only when an install fails
  $SUDO apt-get install -y -q "$@" >/dev/null \
    || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q "$@" >/dev/null; }
}
if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  apt_install dataset-fashion-mnist
fi
# the demo's browser test drives Debian's chromium with selenium
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  apt_install chromium chromium-driver
fi

PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[flax,test,export,demo]"
