#!/usr/bin/env bash
# Regenerate the result tables of README.md and docs/ (and the digits plot) from sweeps run now:
#   scripts/readme_tables.sh          the embedded default's table and plot (about a minute on 2 cores)
#   scripts/readme_tables.sh --real   also docs/calibration.md's ResNet-20 and MobileNetV2 tables (needs data_dir; about 30 minutes)
#   scripts/readme_tables.sh --search also docs/precision.md's ResNet-20 search tables, three splits (needs data_dir; about 40 minutes)
# Sweeps land in multirun/readme/<table>/; finished jobs are skipped on a rerun. Each table is rewritten
# in place between its <!-- NAME --> and <!-- /NAME --> markers by `python -m fxpsweep.aggregate`.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
store=multirun/readme

table() {  # table FILE MARKER SWEEP_ARGS...
  local file=$1 marker=$2; shift 2
  "$python" run.py -m "$@" "hydra.sweep.dir=$store/$marker"
  "$python" -m fxpsweep.aggregate "$store/$marker" --readme "$file" --marker "$marker"
}

search_table() {  # search_table FILE MARKER NAME SEARCH_ARGS...: a search's search.md, between the markers
  local file=$1 marker=$2 out=multirun/search/$3; shift 3
  "$python" -m fxpsweep.search "$@" "search.out=$out"
  "$python" -c 'import sys; from pathlib import Path; from fxpsweep.sweep.aggregate import replace_between_markers as put
f = Path(sys.argv[1]); f.write_text(put(f.read_text(), sys.argv[2], Path(sys.argv[3]).read_text()))' "$file" "$marker" "$out/search.md"
}

if [ "${1:-}" = --search ]; then
  for seed in 0 1 2; do
    marker=search-resnet20$([ $seed = 0 ] || echo "-seed$seed")
    search_table docs/precision.md "$marker" "resnet20-a8-seed$seed" model=resnet20_cifar10 dataset=cifar10_test2000 \
      search.tolerance=1.0 search.activation_bits=8 seed=$seed
  done
  exit 0
fi

table README.md digits-table bits=2,3,4,5,6,8,16
cp "$store/digits-table/bits_vs_accuracy.png" docs/digits_bits_vs_accuracy.png
if [ "${1:-}" = --real ]; then
  table docs/calibration.md resnet20-table model=resnet20_cifar10 dataset=cifar10_test2000 bits=4,5,6,8,10,12,16 calibration.bias_correction=true,false
  table docs/calibration.md mobilenet-table model=mobilenet_v2_fused dataset=imagenet_val1300 bits=8 calibration.granularity=channel,tensor calibration.bias_correction=true,false
fi
