#!/usr/bin/env bash
# Make, here (no GPU needed), what scripts/gpu_checks.sh needs on the lent GPU machine, which has
# torch, triton and transformers but no hydra-core/omegaconf, and no ../shared:
#   .whl/  wheels for Python 3.12 (hydra-core, omegaconf, antlr4, datasets; ../shared/tools/device-wheels.sh)
#   .gpu/  vocab.txt (bert-base-uncased), wiki.txt (the first ~4 MB of the ../shared Wikipedia extract,
#          whole documents), dev-v1.1.json (SQuAD v1.1 dev)
# Both are ignored by git. Then, on the device machine, with .whl and .gpu carried:
#   bash scripts/gpu_checks.sh all
# Usage: scripts/gpu_bundle.sh [WIKI_MB]   (default 4)
set -euo pipefail
cd "$(dirname "$0")/.."
shared="${SHARED:-../shared}"
if [ ! -d "$shared/data" ]; then
  echo "gpu_bundle.sh needs the shared data folder at $shared (set SHARED=...)" >&2
  exit 2
fi
"$shared/tools/device-wheels.sh"
# the hydra-core and omegaconf this checkout is tested with, if newer than device-wheels.sh's pins
for pkg in hydra-core omegaconf; do
  v=$(python3 -c "import importlib.metadata as m; print(m.version('$pkg'))" 2>/dev/null) || continue
  ls .whl/"${pkg//-/_}-$v"-*.whl >/dev/null 2>&1 && continue
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl "$pkg==$v" &&
    find .whl -name "${pkg//-/_}-*.whl" ! -name "${pkg//-/_}-$v-*.whl" -delete
done
mkdir -p .gpu
install -m 644 "$shared/data/vocab/bert-base-uncased-vocab.txt" .gpu/vocab.txt
install -m 644 "$shared/data/squad/dev-v1.1.json" .gpu/dev-v1.1.json
python3 - "$shared/data/wiki/enwiki_sample_0.txt.gz" .gpu/wiki.txt "${1:-4}" <<'PY'
import gzip
import sys

source, target, megabytes = sys.argv[1], sys.argv[2], float(sys.argv[3])
written = 0
with gzip.open(source, "rt", encoding="utf-8") as f, open(target, "w", encoding="utf-8") as out:
    for line in f:
        out.write(line)
        written += len(line.encode())
        if line.strip() == "</doc>" and written >= megabytes * 1e6:
            break
print(f"{target}: {written / 1e6:.1f} MB of whole documents")
PY
du -sh .whl .gpu
