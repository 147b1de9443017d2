"""Does storing the shipped weights at a lower precision change any answer? Measured, not assumed.

    # a copy of the assets with the candidates applied (LoRA bf16, EvoMoE's routers bf16, deltas fp8)
    python scripts/check_weights_precision.py convert assets/embedded /tmp/assets_bf16 \\
        --lora bf16 --evomoe-routers bf16 --deltas fp8
    # every system on N val questions with each folder's weights; accuracy and identical answers
    python scripts/check_weights_precision.py compare assets/embedded /tmp/assets_bf16 --n 240 --out /tmp/precision

`compare` answers the first N questions of the val split (bench.test_questions(n, split="val"), each with
its conversation so far, as `python -m roe_core.embedded calibrate` does) with each system
(systems.load_systems: dense, roe at its calibrated threshold, moe_llava, evomoe), greedy, fp32 on CPU,
through bench.evaluate, the recipe's evaluation. Each folder runs in its own subprocess with
ROE_EMBEDDED_ASSETS set to it (the library reads it at import). Answers go to <out>/<label>.json after
every system (rerun with --reuse to keep a folder's finished answers); the table to <out>/report.md and
<out>/report.json: per system accuracy with A and with B, and the fraction of identical answers.

`convert` copies folder A to B (B is replaced) and re-stores its tensors through runtime.weights:
--lora bf16 (lora/adapter_model.safetensors, read by peft), --evomoe-routers bf16 (evomoe's DTRs,
`moe.#.router.*`), --deltas fp8 (the MoE systems' rank-16 expert and dense-FFN delta factors `*.delta.*`,
float8_e4m3fn with a per-row bf16 scale). Whatever is not named keeps its stored precision.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SYSTEMS = ("dense", "roe", "moe_llava", "evomoe")


# ----------------------------------------------------------------------------- convert


def convert(src: Path, dst: Path, lora: str, evomoe_routers: str, deltas: str) -> dict:
    sys.path.insert(0, str(REPO))
    import torch
    from roe_core.runtime.weights import load_tensors, save_tensors, stored_dtypes, weights_exist

    if dst.resolve() == src.resolve():
        raise SystemExit("convert: the destination must differ from the source")
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)

    def restore(path: Path, to_bf16, to_fp8) -> None:
        """Re-stores one file (plain, or packed: runtime.weights): names matched by to_fp8 -> fp8, by
        to_bf16 -> bf16, others as stored."""
        if not weights_exist(path):
            return
        state = load_tensors(path)
        save_tensors(state, path, keep_fp32=lambda n: state[n].dtype == torch.float32 and not to_bf16(n) and not to_fp8(n),
                     fp8=to_fp8)

    fp8 = (lambda n: ".delta." in n) if deltas == "fp8" else (lambda n: False)
    restore(dst / "lora" / "adapter_model.safetensors", lambda n: lora == "bf16", lambda n: False)
    restore(dst / "moe_llava" / "moe.safetensors", lambda n: False, fp8)
    restore(dst / "evomoe" / "evomoe.safetensors", lambda n: evomoe_routers == "bf16" and ".router." in n, fp8)
    out = {}
    for p in sorted([*dst.rglob("*.safetensors"), *dst.rglob("*.safetensors.xz")]):
        kinds: dict[str, int] = {}
        for dt in stored_dtypes(p.with_name(p.name.removesuffix(".xz"))).values():
            kinds[dt] = kinds.get(dt, 0) + 1
        out[str(p.relative_to(dst))] = {"bytes": p.stat().st_size, "dtypes": kinds}
    print(json.dumps(out, indent=1))
    return out


# ----------------------------------------------------------------------------- answer (one folder, in a subprocess)


def answer(n: int, systems: list[str], out: Path, reuse: bool) -> None:
    """Runs with ROE_EMBEDDED_ASSETS already set: answers n val questions with each system."""
    sys.path.insert(0, str(REPO))
    import torch
    torch.set_num_threads(int(os.environ.get("ROE_THREADS", "2")))
    from roe_core.bench import evaluate, test_questions
    from roe_core.embedded.base import ASSETS
    from roe_core.systems import load_systems

    done = json.loads(out.read_text()) if reuse and out.is_file() else {}
    if done.get("n") != n or done.get("assets") != str(ASSETS):
        done = {"assets": str(ASSETS), "n": n, "systems": {}}
    todo = [s for s in systems if s not in done["systems"]]
    if not todo:
        return
    qs = test_questions(n, split="val")
    pipes = load_systems(todo, device="cpu", dtype="float32")
    for s in todo:
        t0 = time.perf_counter()
        preds, ok, _ = evaluate(pipes[s], qs, None, 16, 24)
        done["systems"][s] = {"predictions": preds, "correct": [bool(x) for x in ok],
                              "accuracy": sum(ok) / len(ok), "seconds": time.perf_counter() - t0}
        out.write_text(json.dumps(done, indent=1))
        print(f"{ASSETS}: {s} {done['systems'][s]['accuracy']:.4f} ({done['systems'][s]['seconds']:.0f} s)", flush=True)


# ----------------------------------------------------------------------------- compare


def compare(a: Path, b: Path, n: int, systems: list[str], out: Path, reuse: bool) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    sides = {}
    for label, folder in (("A", a), ("B", b)):
        path = out / f"{label}.json"
        cmd = [sys.executable, __file__, "_answer", "--n", str(n), "--systems", ",".join(systems), "--json", str(path)]
        if reuse:
            cmd.append("--reuse")
        env = {**os.environ, "ROE_EMBEDDED_ASSETS": str(folder.resolve())}
        subprocess.run(cmd, env=env, check=True)
        sides[label] = json.loads(path.read_text())
    rows = []
    for s in systems:
        ra, rb = sides["A"]["systems"][s], sides["B"]["systems"][s]
        same = [pa == pb for pa, pb in zip(ra["predictions"], rb["predictions"])]
        diff = [{"question": i, "A": pa, "B": pb, "A_correct": ca, "B_correct": cb}
                for i, (pa, pb, ca, cb) in enumerate(zip(ra["predictions"], rb["predictions"], ra["correct"], rb["correct"]))
                if pa != pb]
        rows.append({"system": s, "n": len(same), "accuracy_A": ra["accuracy"], "accuracy_B": rb["accuracy"],
                     "identical": sum(same), "identical_fraction": sum(same) / len(same), "differences": diff})
    report = {"A": str(a), "B": str(b), "n": n, "split": "val", "rows": rows}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    lines = [f"A = `{a}`, B = `{b}`; {n} val questions, greedy, fp32 on CPU", "",
             "| system | accuracy A | accuracy B | identical answers |", "|---|---|---|---|"]
    lines += [f"| {r['system']} | {r['accuracy_A']:.4f} | {r['accuracy_B']:.4f} | {r['identical']} / {r['n']} "
              f"({r['identical_fraction']:.3f}) |" for r in rows]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    for r in rows:
        for d in r["differences"]:
            print(f"  {r['system']} q{d['question']}: A {d['A']!r} ({d['A_correct']}) / B {d['B']!r} ({d['B_correct']})")
    return report


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="copy an assets folder and re-store its tensors at lower precision")
    c.add_argument("src", type=Path)
    c.add_argument("dst", type=Path)
    c.add_argument("--lora", choices=("keep", "bf16"), default="keep")
    c.add_argument("--evomoe-routers", choices=("keep", "bf16"), default="keep")
    c.add_argument("--deltas", choices=("keep", "fp8"), default="keep")
    m = sub.add_parser("compare", help="answer val questions with both folders' weights and compare")
    m.add_argument("a", type=Path)
    m.add_argument("b", type=Path)
    for p in (m, sub.add_parser("_answer")):
        p.add_argument("--n", type=int, default=240)
        p.add_argument("--systems", default=",".join(SYSTEMS))
        p.add_argument("--reuse", action="store_true", help="keep answers already in the folder's JSON")
    m.add_argument("--out", type=Path, default=Path("/tmp/weights_precision"))
    sub.choices["_answer"].add_argument("--json", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.cmd == "convert":
        convert(args.src, args.dst, args.lora, args.evomoe_routers, args.deltas)
    elif args.cmd == "_answer":
        answer(args.n, args.systems.split(","), args.json, args.reuse)
    else:
        compare(args.a, args.b, args.n, args.systems.split(","), args.out, args.reuse)


if __name__ == "__main__":
    main()
