#!/usr/bin/env bash
# Make real Fashion-MNIST available offline. Never asks questions; never fails the build.
# Looks in $FLAGJAX_DATA_DIR, then Debian's dataset-fashion-mnist location; installs the package when
# running as root with apt-get, else says how to get it.
set -u
deb=/usr/share/datasets/fashion-mnist
if [ -n "${FLAGJAX_DATA_DIR:-}" ] && [ -e "${FLAGJAX_DATA_DIR}/train-images-idx3-ubyte.gz" ]; then
  echo "data: using FLAGJAX_DATA_DIR=${FLAGJAX_DATA_DIR}"; exit 0
fi
if [ -e "$deb/train-images-idx3-ubyte.gz" ]; then
  echo "data: Fashion-MNIST found in $deb"; exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "data: installing Debian package dataset-fashion-mnist"
  export DEBIAN_FRONTEND=noninteractive
  if apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
     || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; }; then
    echo "data: Fashion-MNIST installed in $deb"; exit 0
  fi
  echo "data: could not install dataset-fashion-mnist with apt-get" >&2
fi
cat >&2 <<MSG
data: Fashion-MNIST not found. Either
  - as root: apt-get install dataset-fashion-mnist   (files land in $deb), or
  - put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and
    t10k-labels-idx1-ubyte.gz in a folder and set FLAGJAX_DATA_DIR to it.
MSG
exit 0
