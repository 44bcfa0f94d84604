#!/bin/sh
# A stand-in for the CPU image's base (python:3.11-slim-bookworm) where no container registry can
# be reached: Debian bookworm's own Python 3.11 with venv, pip and CA certificates, made with
# mmdebstrap from Debian's packages, python and pip linked where the official image has them.
# Usage: deploy/podman/base-image.sh [TAG]
set -eu
tag="${1:-docker.io/library/python:3.11-slim-bookworm}"
mmdebstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    --customize-hook='ln -sf /usr/bin/python3 "$1/usr/local/bin/python"; ln -sf /usr/bin/pip3 "$1/usr/local/bin/pip"' \
    bookworm - | podman import --change 'CMD ["python3"]' - "$tag"
