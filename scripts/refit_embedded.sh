#!/usr/bin/env bash
# Refits every system of the embedded model on a new dense base, with the commands that made the shipped
# ones (issue 35), into a copy of the assets, so what ships is untouched until the whole chain is done:
#
#     scripts/refit_embedded.sh ASSETS_COPY RUNS_FOLDER
#
# ASSETS_COPY: a copy of assets/embedded whose dense base is the new one (e.g. the widen stage's run); when
# it does not exist yet, it is made from assets/embedded and the widen stage's result committed in
# resume/embedded/ (its LoRA as it ships, its stages.json entry and its curve);
# RUNS_FOLDER: where the checkpoints go. Every step runs with --resume and is recorded in
# ASSETS_COPY/refit_done.txt when it ends, so the script can be stopped and run again at any time: it goes
# on from the step (and the checkpoint) it reached. The first run resets the refit stages' entries in
# ASSETS_COPY/stages.json (they describe the systems fitted on the previous base).
#
# Every trained system gets the same data (the train split's first 3,000 scenes, reworded and restyled as
# well as plain: --wide-data) and its shipped step budget: RoE's refine 300 x 8 (from the shipped RoE
# parts, as before), the fixed path 300 x 8, MoE-LLaVA 450 x 8, EvoMoE 225 + 225 x 8. Then RoE's threshold
# and route guard are chosen again on val. The familiarity check reads only the vision tower, which the
# widen stage leaves as it is.
#
# What a finished step made is committed between sessions (running processes end when a session does):
#
#     scripts/refit_embedded.sh --save ASSETS_COPY RUNS_FOLDER
#
# packs the copy's weights (python -m roe_core.embedded pack) and copies what the finished steps made into
# resume/embedded/refit/ (their parts folders, stages.json, the curves, refit_done.txt; EvoMoE's evolve
# checkpoint while its router step has not run). A copy made afresh from resume/embedded/ starts from them.
# A step not finished restarts from its own checkpoint in RUNS_FOLDER when that is there, else from step 0.
#
# When every step is done, the new base and every system on it ship together (the old parts leave):
#
#     scripts/refit_embedded.sh --ship ASSETS_COPY RUNS_FOLDER
#
# packs the copy and makes assets/embedded/ what it holds (refit_done.txt aside; the model card, README.md,
# stays the repository's), and removes resume/embedded/.
set -euo pipefail
SAVE=0; SHIP=0
if [ "${1:-}" = "--save" ]; then SAVE=1; shift; fi
if [ "${1:-}" = "--ship" ]; then SHIP=1; shift; fi
A=${1:?usage: scripts/refit_embedded.sh [--save|--ship] ASSETS_COPY RUNS_FOLDER}
R=${2:?usage: scripts/refit_embedded.sh [--save|--ship] ASSETS_COPY RUNS_FOLDER}
PY=${PY:-.venv/bin/python}
S=resume/embedded/refit
export ROE_EMBEDDED_ASSETS=$A ROE_EMBEDDED_RUNS=$R
DONE=$A/refit_done.txt
DATA=(--wide-data --n-roe-data 3000 --save-every 25 --log-every 5)
STEPS="refine calibrate guard static moe_llava evomoe_evolve evomoe_router"

if [ "$SAVE" = 1 ]; then
  [ -f "$A/refit_done.txt" ] || { echo "no $A/refit_done.txt: nothing refit yet" >&2; exit 2; }
  ROE_EMBEDDED_ASSETS=$A $PY -m roe_core.embedded pack
  rm -rf "$S"; mkdir -p "$S"
  cp "$A/stages.json" "$A/refit_done.txt" "$S/"
  cp -r "$A/logs" "$S/logs"
  done_() { grep -qx "$1" "$A/refit_done.txt"; }
  if done_ refine; then cp -r "$A/roe" "$S/roe"; fi
  if done_ static; then cp -r "$A/static" "$S/static"; fi
  if done_ moe_llava; then cp -r "$A/moe_llava" "$S/moe_llava"; fi
  if done_ evomoe_router; then cp -r "$A/evomoe" "$S/evomoe"
  elif done_ evomoe_evolve; then
    mkdir -p "$S/runs/evomoe/evolve"
    cp "$R/evomoe/evolve/evomoe_config.json" "$R/evomoe/evolve/evomoe.safetensors" "$S/runs/evomoe/evolve/"
    ROE_EMBEDDED_ASSETS=$S/runs $PY -m roe_core.embedded pack
  fi
  # the step that was running: its checkpoint's weights in bf16 (packed), its curve and where it stood;
  # AdamW's moments are not kept (it restarts from them, at that step of the schedule)
  for s in $STEPS; do
    done_ "$s" && continue
    run=$(case $s in static) echo static;; moe_llava) echo moe_llava;; evomoe_evolve) echo evomoe/evolve;;
                     evomoe_router) echo evomoe/router;; refine) echo refine;; esac)
    if [ -n "$run" ] && [ -f "$R/$run/trainer_state.json" ]; then
      $PY - "$R/$run" "$S/runs/$run" <<'EOF'
import json, shutil, sys
from pathlib import Path
from safetensors.torch import save_file
from roe_core.runtime.weights import load_tensors, pack_file, save_tensors
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir(parents=True, exist_ok=True)
for f in src.iterdir():
    if f.suffix in (".json", ".jsonl") and f.name != "trainer_state.json":
        shutil.copy(f, dst / f.name)
    elif f.name.endswith(".safetensors") and not f.name.startswith("optimizer"):
        save_tensors(load_tensors(f), dst / f.name)          # bf16
        pack_file(dst / f.name)
state = json.loads((src / "trainer_state.json").read_text())
state.update(optimizer="optimizer.safetensors", **{"from": "resume/embedded/refit: the weights in bf16, AdamW afresh"})
(dst / "trainer_state.json").write_text(json.dumps(state, indent=1))
save_file({}, str(dst / "optimizer.safetensors"), metadata={"steps": "{}"})
print(f"{src} at step {state['step']} -> {dst}")
EOF
    fi
    break
  done
  echo "== saved into $S: $(tr '\n' ' ' < "$A/refit_done.txt")($(du -sh "$S" | cut -f1))"
  exit 0
fi

if [ "$SHIP" = 1 ]; then
  for s in $STEPS; do grep -qx "$s" "$A/refit_done.txt" || { echo "$s is not done in $A: nothing ships" >&2; exit 2; }; done
  ROE_EMBEDDED_ASSETS=$A $PY -m roe_core.embedded pack
  $PY - "$A/stages.json" <<'EOF'
import json, sys
p = sys.argv[1]
state = json.load(open(p))
for stage in ("calibrate", "guard"):        # an earlier reset gave these (no steps) a step count: not theirs
    for k in ("step", "target_steps", "done"):
        state.get(stage, {}).pop(k, None)
json.dump(state, open(p, "w"), indent=1)
EOF
  rm -rf assets/embedded.new && cp -r "$A" assets/embedded.new && rm -f assets/embedded.new/refit_done.txt
  cp assets/embedded/README.md assets/embedded.new/README.md     # the model card is kept in the repository
  rm -rf assets/embedded && mv assets/embedded.new assets/embedded
  rm -rf resume/embedded
  echo "== assets/embedded is the refit base and its systems; resume/embedded/ removed (commit both)"
  exit 0
fi

FRESH=0
if [ ! -d "$A" ]; then
  FRESH=1
  [ -d resume/embedded ] || { echo "no $A and no resume/embedded/ to make it from" >&2; exit 2; }
  cp -r assets/embedded "$A"
  $PY - "$A" <<'EOF'
import json, shutil, sys
from pathlib import Path
a, src = Path(sys.argv[1]), Path("resume/embedded")
shutil.copytree(src / "lora_wide", a / "lora_wide")     # as it ships: its weights xz-packed
state = json.loads((a / "stages.json").read_text())
state["widen"] = json.loads((src / "widen.json").read_text())
(a / "stages.json").write_text(json.dumps(state, indent=1))
shutil.copy(src / "widen.jsonl", a / "logs" / "widen.jsonl")
print(f"{a}: assets/embedded + the widen stage from {src}")
EOF
fi

if [ ! -f "$DONE" ]; then
  $PY - "$A/stages.json" <<'EOF'
import json, sys
p = sys.argv[1]
state = json.load(open(p))
for stage in ("refine", "static", "moe_llava", "evomoe_evolve", "evomoe_router"):
    state[stage] = {"step": 0, "target_steps": state.get(stage, {}).get("target_steps", 0), "done": False,
                    "refit": "on the new dense base: scripts/refit_embedded.sh"}
for stage in ("calibrate", "guard"):        # no steps: chosen on val
    state[stage] = {"refit": "on the new dense base: scripts/refit_embedded.sh"}
json.dump(state, open(p, "w"), indent=1)
EOF
  # the route guard's statistics describe the old base's router inputs: on the new one it would stop every
  # route (30 of 30 layers), calibrate included; the guard step fits it again
  rm -f "$A"/roe/guard.safetensors "$A"/roe/guard.safetensors.xz
  touch "$DONE"
fi
if [ "$FRESH" = 1 ] && [ -d "$S" ]; then     # the steps finished in an earlier session (--save)
  cp -r "$S/." "$A/"
  if [ -d "$A/runs" ]; then        # saved checkpoints, where RUNS has none of its own
    for d in $(cd "$A/runs" && find . -name '*.json' -printf '%h\n' | sort -u); do
      [ -f "$R/$d/trainer_state.json" ] || [ -f "$R/$d/evomoe_config.json" ] || { mkdir -p "$R/$d"; cp -r "$A/runs/$d/." "$R/$d/"; }
    done
    rm -rf "$A/runs"
  fi
  echo "$A: the refit steps saved in $S: $(tr '\n' ' ' < "$DONE")"
fi

step() {
  local name=$1; shift
  if grep -qx "$name" "$DONE"; then echo "== $name: done before"; return; fi
  echo "== $name: $* ($(date -u +%H:%M))"
  "$@"
  echo "$name" >> "$DONE"
}

step refine    $PY -m roe_core.embedded refine --resume --steps 300 --batch-size 8 --distill 1.0 --backbone none \
                   --per-turn-sparsity --rho-max 0.55 --final-eval-n 50 "${DATA[@]}"
step calibrate $PY -m roe_core.embedded calibrate --calibrate-n 240 --wide-n 240 --thresholds 0.5,0.48,0.46,0.44,0.42,0.4 --min-skip 0.35
step guard     $PY -m roe_core.embedded guard --calibrate-n 240 --wide-n 240 --quantiles 0.9,0.97,0.99 --min-skip 0.35
step static    $PY -m roe_core.embedded static --resume --steps 300 --batch-size 8 --distill 1.0 "${DATA[@]}"
step moe_llava $PY -m roe_core.embedded moe-llava --resume --steps 450 --batch-size 8 "${DATA[@]}"
step evomoe_evolve $PY -m roe_core.embedded evomoe-evolve --resume --steps 225 --batch-size 8 "${DATA[@]}"
step evomoe_router $PY -m roe_core.embedded evomoe-router --resume --steps 225 --batch-size 8 "${DATA[@]}"
echo "== every system refit on the base in $A"
