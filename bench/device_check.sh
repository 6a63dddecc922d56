#!/usr/bin/env bash
# The GPU check in one command (see bench/device_check.py for the stages):
#
#   bench/device_check.sh OUTDIR [--smoke] [--budget-s 450] [--stages env,tests,generator,sessions,parity,pose]
#
# Writes OUTDIR/device_check.json, device_check.txt (tables) and device_check.log; ends within the budget
# (default 450 s: under 8 minutes on an H100/H200 with start-up). Python: $PYTHON, else python3 (the device
# image's interpreter, which holds its own torch; nothing is installed over it). Wheels of missing pure-Python
# packages, if the caller carried a .whl/ folder, are installed into a private folder first. The parity stage
# needs the oracle: $PCAVS_SHARED_DIR (a folder holding parity/make_weights.py, manifest.json, cases/), else
# ./shared or ../shared; without it that stage reports only the precision rows on random weights.
# Everything the check writes stays under OUTDIR, a failed stage included: temporary files (the carried
# wheels' install folder, compile caches, generated parity weights, stage results) go to OUTDIR/tmp, which
# bench/device_check.py removes at the end unless a stage left something there to look at.
set -u
out="${1:?usage: bench/device_check.sh OUTDIR [--smoke] [--budget-s S] [--stages a,b,...]}"
shift
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
mkdir -p "$out" || exit 2
out="$(cd "$out" && pwd)"
export TMPDIR="$out/tmp"
mkdir -p "$TMPDIR" || exit 2
# Compile caches (the fused tail's Triton kernels; torch's inductor folder, made when torch imports
# triton) go there too instead of ~/.triton and /tmp: removed at the end with the carried wheels.
export TRITON_CACHE_DIR="$TMPDIR/triton_cache" TORCHINDUCTOR_CACHE_DIR="$TMPDIR/torchinductor_cache"
py="${PYTHON:-python3}"
"$py" - <<'PYCHECK' || { echo "device_check: $py cannot import torch" >&2; exit 2; }
import sys, torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA build {torch.version.cuda}), "
      f"CUDA available: {torch.cuda.is_available()}")
PYCHECK
if compgen -G ".whl/*.whl" > /dev/null; then
    site="$TMPDIR/pcavs_site"
    if "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl; then
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "device_check: installing the carried wheels failed; continuing without them" >&2
    fi
fi
export PYTHONUNBUFFERED=1
exec "$py" bench/device_check.py --out "$out" "$@"
