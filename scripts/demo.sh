#!/usr/bin/env bash
# The main job on a fresh machine: virtualenv, install, Fashion-MNIST, then the embedded default run of
# train_vision.py (a small CAMEx ViT, about eleven minutes on two idle CPU cores), which ends with a short report and
# writes PNG plots (learning curves, expert usage per MoE layer) into its output folder.
#
#   scripts/demo.sh                    # what `make demo` runs
#   scripts/demo.sh --epochs 1         # extra arguments go to train_vision.py
#
# Environment: PYTHON (default python3) creates the virtualenv VENV (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
FASHION_DIR=/usr/share/datasets/fashion-mnist

# 1. virtualenv and install (skipped when the environment already has everything)
if ! "$PY" -c 'import camex_vision, timm, torchvision, torchmetrics, matplotlib' 2>/dev/null; then
    echo "== creating $VENV and installing camex_vision"
    test -x "$PY" || "$PYTHON" -m venv "$VENV"
    "$PY" -m pip install --upgrade pip
    "$PY" -m pip install -e '.[plots]'
fi

# 2. data: the Debian package where apt and root (or password-less sudo) are available; otherwise
#    train_vision.py finds ./data/FashionMNIST or lets torchvision download it
if [ ! -f "$FASHION_DIR/train-images-idx3-ubyte.gz" ] && [ ! -f data/FashionMNIST/raw/train-images-idx3-ubyte ]; then
    SUDO=''
    if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO='sudo -n'; fi
    if command -v apt-get >/dev/null && { [ "$(id -u)" = 0 ] || [ -n "$SUDO" ]; }; then
        echo "== installing Fashion-MNIST (apt-get install dataset-fashion-mnist)"
        export DEBIAN_FRONTEND=noninteractive
        $SUDO apt-get install -y --no-install-recommends dataset-fashion-mnist \
            || { $SUDO apt-get update && $SUDO apt-get install -y --no-install-recommends dataset-fashion-mnist; } \
            || echo "== apt-get could not install dataset-fashion-mnist: torchvision will download Fashion-MNIST"
    else
        echo "== no apt-get with root: torchvision will download Fashion-MNIST into ./data"
    fi
fi

# 3. the embedded default run
echo "== python train_vision.py $*"
exec "$PY" train_vision.py "$@"
