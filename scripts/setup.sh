#!/usr/bin/env bash
# One-time setup: system packages for rendering without a GPU, then the Python dependencies.
# Idempotent and quick when everything is already installed. Debian 12 / Ubuntu; run as root or with sudo.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"

have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
mesa_ok() {  # SAPIEN needs Mesa >= 24.3 for software Vulkan (lavapipe)
  have_pkg mesa-vulkan-drivers && dpkg --compare-versions "$(dpkg-query -W -f='${Version}' mesa-vulkan-drivers)" ge 24.3
}

if command -v apt-get >/dev/null; then
  if ! mesa_ok || ! have_pkg libosmesa6 || ! have_pkg libvulkan1 || ! have_pkg ffmpeg; then
    export DEBIAN_FRONTEND=noninteractive
    backports=()
    if grep -q 'VERSION_CODENAME=bookworm' /etc/os-release; then  # Debian 12 ships Mesa 22.3: use bookworm-backports
      if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
        echo "deb http://deb.debian.org/debian bookworm-backports main" | $SUDO tee /etc/apt/sources.list.d/bookworm-backports.list >/dev/null
      fi
      backports=(-t bookworm-backports)
    fi
    $SUDO apt-get update -q
    $SUDO apt-get install -y -q "${backports[@]}" mesa-vulkan-drivers libvulkan1
    $SUDO apt-get install -y -q libosmesa6 libegl1 libgl1 ffmpeg
  fi
fi

python3 -m pip install -q --root-user-action=ignore -r requirements.txt
