#!/usr/bin/env bash
# Installs everything into ./.venv (a virtual environment beside the code; activate it with
# `. .venv/bin/activate`). As root on Debian/Ubuntu it also apt-installs FFCV's system libraries.
# Takes ~3 minutes on a fresh machine (torch's CUDA build is 5.6 GB; it runs on CPU too).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

"${PIP[@]}" -r requirements.txt
# This checkout's packages (pyproject.toml), editable: entry scripts import them from here.
"${PIP[@]}" --no-deps -e .
# Reference PGD for the tests. --no-deps: it pins requests~=2.25, which would downgrade idna.
"${PIP[@]}" --no-deps torchattacks==3.5.1

# Optional loaders: the trainer works without them and says how to get them when asked for.
"${PIP[@]}" nvidia-dali-cuda130==2.4.0 || echo "warning: DALI not installed: loader=dali unavailable" >&2
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      pkg-config libopencv-dev libturbojpeg0-dev >/dev/null) \
    || echo "warning: apt-get could not install FFCV's system libraries" >&2
fi
"${PIP[@]}" ffcv==1.0.2 || echo "warning: FFCV not installed: loader=ffcv unavailable. It needs" \
  "'apt-get install pkg-config libopencv-dev libturbojpeg0-dev' (as root), then rerun ./setup.sh" >&2
echo "setup done: . .venv/bin/activate"
