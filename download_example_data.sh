#!/usr/bin/env bash
# Fetches the NeRF authors' example data (lego and fern) into ./data, as the
# configs expect: data/nerf_synthetic/lego and data/nerf_llff_data/fern.
set -euo pipefail
cd "$(dirname "$0")"
url=http://cseweb.ucsd.edu/~viscomp/projects/LF/papers/ECCV20/nerf/nerf_example_data.zip

if [ -d data/nerf_synthetic/lego ] && [ -d data/nerf_llff_data/fern ]; then
  echo "data/ already holds lego and fern; nothing to do."
  exit 0
fi
mkdir -p data
tmp=$(mktemp data/.nerf_example_data.XXXXXX.zip)
trap 'rm -f "$tmp"' EXIT
if command -v curl >/dev/null; then
  curl -fL --retry 3 -o "$tmp" "$url"
else
  wget -O "$tmp" "$url"
fi
python3 -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall('data')" "$tmp"
echo "Extracted into data/: $(ls data | tr '\n' ' ')"
