#!/usr/bin/env bash
# The whole training recipe on a GPU machine in one command, then one archive of what a model card
# needs: phase 1 → pseudo-masks → independent segmenter → mean-teacher phase 2 → `fundus eval` at both
# resolutions → model-card tables (`fundus train all`, resumable), archived without checkpoints.
#
# The machine needs python3 with torch, numpy, opencv, pyyaml, safetensors, tqdm and tensorboard; the
# service's packages (fastapi, pydantic, redis, pydicom, ...) are not used. Where the data pack is not
# on that machine, send a packed copy of what the config uses (about 55 MB for gpu.yaml):
#
#   python -m training.pack_data --config training/configs/gpu.yaml --out .pack --max-mb 54   # here
#   DATA=.pack bash training/gpu_train.sh                                                     # there
#   DATA=.pack DEVICE=cpu CONFIG=training/configs/smoke.yaml MINUTES=3 bash training/gpu_train.sh  # dry run
#
# Environment: CONFIG (training/configs/gpu.yaml), DATA (the config's data.root), MINUTES (9: time
# budget of all phases), DEVICE (the config's run.device), OUT (where the archives and the log go;
# default runs/). Extra arguments are passed to `train all` (e.g. --set enhance.steps=2000).
# Output: <run>-run.tar.gz (weights, curves, configs, roles, evaluation report and tables),
# <run>-eval-images.tar (the evaluation's side-by-side grids as JPEGs) and <run>-train.log.
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG=${CONFIG:-training/configs/gpu.yaml}
MINUTES=${MINUTES:-9}
DEST=${OUT:-runs}
mkdir -p "$DEST"
export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}

overrides=()
if [ -n "${DATA:-}" ]; then overrides+=(--set "data.root=$DATA"); fi
if [ -n "${DEVICE:-}" ]; then overrides+=(--set "run.device=$DEVICE"); fi

run_dir=$(python3 - "$CONFIG" "${overrides[@]}" "$@" <<'EOF'
import sys
from pathlib import Path

from training.config import load_config

args, overrides = sys.argv[2:], []
for flag, value in zip(args, args[1:]):
    if flag == "--set":
        overrides.append(value)
config = load_config(sys.argv[1], overrides)
print(Path(config.run.out_root) / config.run.name)
EOF
)
mkdir -p "$run_dir"
name=$(basename "$run_dir")
{
    date -u +"started %Y-%m-%dT%H:%M:%SZ"
    python3 -c "import platform, torch; print(platform.node(), platform.processor() or platform.machine(), \
'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    fi
    nproc
} > "$run_dir/machine.txt"
cat "$run_dir/machine.txt"

status=0
python3 -m training.cli train all --config "$CONFIG" "${overrides[@]}" --max-minutes "$MINUTES" "$@" \
    2>&1 | tee "$DEST/$name-train.log" || status=$?

# Everything but checkpoints, the pseudo-mask images (their summary stays) and the evaluation's
# image grids, which follow as JPEGs in a second archive (as PNGs they are ~1 MB each).
tar czf "$DEST/$name-run.tar.gz" -C "$(dirname "$run_dir")" \
    --exclude='checkpoint.pt' --exclude="$name/pseudo-masks/*/*" --exclude="$name/eval/images" "$name"
python3 - "$run_dir/eval/images" "$DEST/$name-eval-images.tar" <<'EOF'
import io
import sys
import tarfile
from pathlib import Path

import cv2

with tarfile.open(sys.argv[2], "w") as archive:
    for grid in sorted(Path(sys.argv[1]).glob("*.png")):
        image = cv2.imread(str(grid), cv2.IMREAD_COLOR)
        ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 85])
        if ok:
            entry = tarfile.TarInfo(f"eval-images/{grid.stem}.jpg")
            entry.size = len(data)
            archive.addfile(entry, io.BytesIO(data.tobytes()))
EOF
ls -l "$DEST/$name-run.tar.gz" "$DEST/$name-eval-images.tar"
exit "$status"
