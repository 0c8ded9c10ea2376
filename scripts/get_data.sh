#!/usr/bin/env bash
# Make sure the four FashionMNIST IDX files exist. Usage: scripts/get_data.sh [folder]
# Looks in the folder given (default: Debian's location, then ./data); when nothing is found and we are root
# with apt, installs Debian's dataset-fashion-mnist package; otherwise says how to get the files.
set -euo pipefail
DEBIAN_ROOT=/usr/share/datasets/fashion-mnist
FILES="train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte"

has_all() {
    local dir=$1 f
    for f in $FILES; do
        [ -f "$dir/$f.gz" ] || [ -f "$dir/$f" ] || [ -f "$dir/FashionMNIST/raw/$f" ] || return 1
    done
}

if [ $# -gt 0 ]; then roots=("$1"); else roots=("$DEBIAN_ROOT" data); fi
for dir in "${roots[@]}"; do
    if has_all "$dir"; then echo "FashionMNIST: found in $dir"; exit 0; fi
done

if [ $# -eq 0 ] && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    echo "FashionMNIST: installing Debian's dataset-fashion-mnist package into $DEBIAN_ROOT"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist
    has_all "$DEBIAN_ROOT" && exit 0
fi

cat >&2 <<MSG
FashionMNIST files not found in: ${roots[*]}
Get them in one of these ways:
  - as root on Debian/Ubuntu: apt-get install dataset-fashion-mnist   (installs into $DEBIAN_ROOT)
  - copy the four files ($FILES, .gz or raw) into ./data or any folder and run with data.root=<folder>
  - when online, let the first run download them: python -m fmnist_lab data.download=true data.root=data
MSG
exit 1
