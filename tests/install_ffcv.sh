#!/usr/bin/env bash
# Install the optional FFCV backend (idempotent): Debian build dependencies, then ffcv into the
# active Python environment. ffcv 1.0.2 is an sdist whose C extension links libturbojpeg and
# OpenCV found through pkg-config; it also pulls numba (CPU only, no cupy needed).
# Usage: bash tests/install_ffcv.sh   (as root, or with sudo available for apt-get)
set -euo pipefail

PYTHON="${PYTHON:-python}"

if "$PYTHON" -c "import ffcv.loader" >/dev/null 2>&1; then
    echo "ffcv already installed: $("$PYTHON" -c 'import importlib.metadata as m; print(m.version("ffcv"))')"
    exit 0
fi

need_apt=0
for pkg in pkg-config libturbojpeg0-dev libopencv-dev; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need_apt=1
done
if [ "$need_apt" = 1 ]; then
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -q
    $SUDO apt-get install -y -q --no-install-recommends pkg-config libturbojpeg0-dev libopencv-dev
fi

"$PYTHON" -m pip install -q "ffcv>=1.0"
"$PYTHON" -c "import ffcv.loader; print('ffcv installed')"
