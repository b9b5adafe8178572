#!/usr/bin/env bash
# The image's /opt/venv, built natively as docker/Dockerfile builds it (the pinned torch from
# TORCH_INDEX_URL, then `pip install .` of the repository), and its size on disk: the bulk of
# the image, which adds the python:3.11-slim base and gcc on top (no Docker engine here to
# weigh the image itself). docs/deploy.md quotes what this prints.
#
#   bash docker/image_venv_size.sh                                              # CPU-only torch
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 bash docker/image_venv_size.sh   # CUDA
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH="${TORCH:-$(sed -n 's/^ARG TORCH=//p' docker/Dockerfile)}"
TORCH_INDEX_URL="${TORCH_INDEX_URL-$(sed -n 's/^ARG TORCH_INDEX_URL=//p' docker/Dockerfile)}"
PYTHON="${PYTHON:-python3.11}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$PYTHON" -m venv "$work/venv"
pip=("$work/venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir)
if ! "${pip[@]}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH" 2>"$work/err"; then
  # No route to that index from here: pip's default index and find-links, as `make venv` does.
  echo "note: ${TORCH_INDEX_URL:-the default index} failed ($(tail -1 "$work/err")); using pip's defaults" >&2
  "${pip[@]}" "$TORCH"
fi
"${pip[@]}" .
"$work/venv/bin/python" -c "import torch; print('torch', torch.__version__, 'cuda' if torch.version.cuda else 'cpu-only')"
echo "venv: $(du -sm "$work/venv" | cut -f1) MB"
echo "  of which torch: $(du -sm "$work"/venv/lib/python3*/site-packages/torch | cut -f1) MB"
