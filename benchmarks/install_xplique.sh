#!/usr/bin/env bash
# Install xplique for benchmarks/engine.py only; it is never a dependency of the package.
# xplique 2.0.2 pins tensorflow[and-cuda]<=2.20 (and scipy/scikit-*), which would downgrade the TensorFlow this
# project runs on, so it goes in without its declared dependencies plus the ones its GuidedBackprop imports.
set -euo pipefail
python -m pip install --no-deps "xplique==2.0.2"
python -m pip install "tf_keras" "tensorflow-probability==0.25.*" dm-tree deprecated einops \
    opencv-python-headless matplotlib
python -c "from xplique.attributions import GuidedBackprop; print('xplique GuidedBackprop importable')"
