"""Training scales the way users run it: `accelerate launch` over 2 processes at batch B per process
is one process at batch 2B (gradients averaged across processes), on the tiny model, CPU, gloo.

Exact equality is impossible: floating-point sums run in another order (and the batches are padded
to other widths), so the comparison is within tolerances stated where they are asserted. What makes
the two runs comparable at all:

* the data: the loop's DataLoader shuffles with `Generator().manual_seed(seed)`; accelerate
  (split_batches=False) shards its batches of size B, process k taking batches k, k+2, ... So the
  one-process batch i of size 2B (the same permutation cut into 2B) holds exactly process 0's and
  process 1's step-i batches: checked from the examples each process actually read.
* the loss: token-mean CE per process, averaged over the processes, equals the token-mean CE over
  the combined batch only if both halves hold as many answer tokens; every answer here is 5
  characters + the end token (6 tokens), so it does.
* l_aux is per process (as in MoE-LLaVA's DeepSpeed reference): E * sum_e mean_prob_e * frac_top1_e
  over a process's tokens is not linear in the batch, so its mean over 2 processes is not its value
  over the combined batch. The runs use aux_loss_coef = 0 (l_aux is still computed and logged: the
  test checks the logged value is the mean of the per-process values, and what it is over 2B).
* expert 2's Gumbel noise is drawn per process over that process's tokens: switched off (in both
  runs) by the launched script. capacity_factor_train = 4 (>= 2 suffices): no token is dropped.

The counterfactual run that shows the tolerances would catch missing averaging: one process at batch B
over exactly process 0's step batches, i.e. what process 0 computes when its gradients are its own.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import DataLoader

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                       reason="torch.distributed with gloo is not available"),
]
REPO = Path(__file__).resolve().parents[1]
N, B, STEPS = 12, 2, 3          # 12 examples: 3 steps of 2 x 2 (one epoch, nothing dropped by drop_last)
QUESTIONS = ["What colour is the circle?", "How many?", "Is there a large red square left of the small blue circle?",
             "Where is it?", "What shape is on the left?", "Any cubes?", "Count the circles.", "Is the big one red?",
             "Which is larger?", "Colour?", "What is next to the square?", "How many blue shapes are there?"]

SCRIPT = r'''
"""A few MoE-tuning steps, as a user runs them: `python this.py ...` or `accelerate launch this.py ...`.
args: data.json images_folder out_folder batch_size steps aux_loss_coef"""
import json
import os
import sys
from pathlib import Path

import torch

import roe_core.systems.moe_llava as moe
from roe_core.runtime.conversation import ConversationEncoder
from roe_core.runtime.tiny import tiny_llava
from roe_core.train.loop import LlavaJsonDataset


def build_model(aux_loss_coef):
    """The tiny base + MoE parts stored as rank-2 deltas (experts and dense FFNs), the same in every
    process and run; experts that differ from the start, so the routers' CE gradient is real."""
    base, tok, proc = tiny_llava(seed=0)
    enc = ConversationEncoder.for_model(base, tok, proc)
    torch.manual_seed(0)
    model = moe.MoELlavaModel(base, expert_delta_rank=2, dense_delta_rank=2, capacity_factor_train=4.0,
                              aux_loss_coef=aux_loss_coef)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for ffn in model.moe.values():
            for e in ffn.experts:
                for d in e.delta.values():
                    d.b.copy_(torch.randn(d.b.shape, generator=g) * 0.3)
    return model, enc


class Logged(torch.utils.data.Dataset):
    """A dataset recording the images of the examples this process reads (num_workers=0: in this process)."""

    def __init__(self, ds):
        self.ds, self.seen = ds, []

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        self.seen.append(self.ds.items[i][0])
        return self.ds[i]


def main():
    torch.set_num_threads(1)
    from accelerate import PartialState
    from safetensors.torch import save_file
    from roe_core.train.moe_llava import MoETuneConfig, train_moe_llava

    data, images, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    batch_size, steps, aux = int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
    top2 = moe.top2_gating       # expert 2's Gumbel noise off (it is drawn per process over its own tokens)
    moe.top2_gating = lambda logits, cf, training, gen=None, mask=None: top2(logits, cf, False, gen, mask)
    model, enc = build_model(aux)
    ds = Logged(LlavaJsonDataset(data, images))
    cfg = MoETuneConfig(steps=steps, batch_size=batch_size, lr=1e-3, log_every=1, save_every=10_000, seed=0)
    train_moe_llava(model, enc, ds, cfg, out, progress=False)
    state = PartialState()
    rank = state.process_index
    names = {id(p): n for n, p in model.named_parameters()}
    save_file({names[id(p)]: p.detach().contiguous() for p in model.ffn_parameters()},
              str(out / f"params_rank{rank}.safetensors"))
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
    (out / f"rank{rank}.json").write_text(json.dumps({"seen": ds.seen, "num_processes": state.num_processes,
                                                      "backend": backend}))


if __name__ == "__main__":
    main()
'''


def make_data(folder: Path) -> list[dict]:
    """N LLaVA records: different images and questions (of different lengths: batches are padded),
    answers of 5 random letters each (6 answer tokens with the end token)."""
    (folder / "images").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    records = []
    for i, q in enumerate(QUESTIONS[:N]):
        Image.fromarray((torch.rand(16, 16, 3, generator=g) * 255).byte().numpy()).save(folder / "images" / f"{i}.png")
        answer = "".join(chr(97 + int(c)) for c in torch.randint(0, 26, (5,), generator=g))
        records.append({"id": i, "image": f"{i}.png", "conversations": [
            {"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": answer}]})
    (folder / "train.json").write_text(json.dumps(records))
    return records


def loader_batches(n: int, batch_size: int) -> list[list[int]]:
    """The batches of indices the loop's DataLoader draws (loop.fit: shuffle, seed 0, drop_last)."""
    dl = DataLoader(range(n), batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0),
                    drop_last=n > batch_size)
    return [b.tolist() for b in dl]


def clean_env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("ACCELERATE_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                            "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               CUDA_VISIBLE_DEVICES="",              # CPU processes (two processes on one GPU would fail in NCCL)
               HF_HOME=str(tmp_path / "hf"))         # no user `accelerate config` file changes the launch
    return env


def run(cmd: list[str], env: dict, cwd: Path) -> None:
    p = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=240)
    if p.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")


def read_run(out: Path, processes: int) -> tuple[list[dict], list[dict], list[dict]]:
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    ranks = [json.loads((out / f"rank{k}.json").read_text()) for k in range(processes)]
    params = [load_file(str(out / f"params_rank{k}.safetensors")) for k in range(processes)]
    return log, ranks, params


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_two_processes_at_batch_b_equal_one_process_at_batch_2b(tmp_path, free_port):
    records = make_data(tmp_path / "data")
    data, images = str(tmp_path / "data" / "train.json"), str(tmp_path / "data" / "images")
    script = tmp_path / "train_moe.py"
    script.write_text(SCRIPT)
    env = clean_env(tmp_path)
    aux = "0"
    # accelerate 1.15: `--cpu --num_processes 2` starts ONE process (its multi-CPU path wants mpirun and a
    # hostfile); `--multi_gpu` starts 2 through torchrun, and the loop's Accelerator(cpu=True) (no CUDA
    # here) then runs them as MULTI_CPU on gloo
    run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--num_cpu_threads_per_process", "1", "--main_process_port", str(free_port()),
         str(script), data, images, str(tmp_path / "two"), str(B), str(STEPS), aux], env, tmp_path)
    run([sys.executable, str(script), data, images, str(tmp_path / "one"), str(2 * B), str(STEPS), aux], env, tmp_path)
    two_log, two_ranks, two_params = read_run(tmp_path / "two", 2)
    one_log, (one_rank,), (one_params,) = read_run(tmp_path / "one", 1)
    assert [r["num_processes"] for r in two_ranks] == [2, 2] and {r["backend"] for r in two_ranks} == {"gloo"}
    assert one_rank["num_processes"] == 1
    assert [row["step"] for row in two_log] == [row["step"] for row in one_log] == [1, 2, 3]

    # --- the same examples: the one-process batch i is the two processes' step-i batches together
    name = [r["image"] for r in records]
    small, large = loader_batches(N, B), loader_batches(N, 2 * B)
    assert all(large[i] == small[2 * i] + small[2 * i + 1] for i in range(STEPS))
    for k, r in enumerate(two_ranks):
        assert r["seen"][:STEPS * B] == [name[j] for i in range(STEPS) for j in small[2 * i + k]]
    assert one_rank["seen"][:STEPS * 2 * B] == [name[j] for i in range(STEPS) for j in large[i]]
    shards = [[[j for j in small[2 * i + k]] for k in range(2)] for i in range(STEPS)]   # [step][process]

    # --- the first logged loss (before any update): CE over 2 x 6 answer tokens per process, averaged,
    # is the CE over the 24 of the combined batch. The same examples through the same weights: only
    # the summation order and the padding width differ (~1e-7 relative in fp32): 1e-5
    spec = importlib.util.spec_from_file_location("train_moe_script", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from roe_core.systems.moe_llava import moe_lm_loss
    from roe_core.train.loop import LlavaJsonDataset, make_collate
    model, enc = mod.build_model(0.0)
    model.eval()              # = training mode at step 0 here: no drops at either capacity, no noise, no dropout
    ds, collate = LlavaJsonDataset(data, images), make_collate(enc)
    with torch.no_grad():
        per_process = [moe_lm_loss(model, collate([ds[j] for j in shard])) for shard in shards[0]]
        combined = moe_lm_loss(model, collate([ds[j] for j in large[0]]))
    for shard in shards[0]:
        assert int(collate([ds[j] for j in shard]).answer_mask.sum()) == 6 * B   # equal answer tokens
    ce_mean = sum(float(p["ce"]) for p in per_process) / 2
    assert float(combined["ce"]) == pytest.approx(ce_mean, rel=1e-5)
    assert two_log[0]["loss"] == pytest.approx(one_log[0]["loss"], rel=1e-5)
    assert two_log[0]["loss"] == pytest.approx(ce_mean, rel=1e-5)                 # the mean over processes is logged
    assert one_log[0]["loss"] == pytest.approx(float(combined["ce"]), rel=1e-5)
    # l_aux (not in the loss here) is logged as the mean of the per-process values; over 2B it is another
    # number (not linear in the batch), which is why the runs leave it out of the loss
    assert two_log[0]["l_aux"] == pytest.approx(sum(float(p["l_aux"]) for p in per_process) / 2, rel=1e-5)
    assert one_log[0]["l_aux"] == pytest.approx(float(combined["l_aux"]), rel=1e-5)
    # later steps: the same updates before them, so the same losses (rounding compounds a little): 1e-4
    for a, b in zip(two_log, one_log):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)

    # --- the parameters after 3 steps
    keys = sorted(one_params)
    assert keys == sorted(two_params[0]) == sorted(two_params[1]) and len(keys) > 50
    # averaged gradients are the same numbers in both processes: their AdamW steps are identical
    assert all(torch.equal(two_params[0][k], two_params[1][k]) for k in keys)
    init = {n: p.detach() for n, p in model.named_parameters()}
    change = {run: torch.cat([(p[k] - init[k]).flatten() for k in keys]) for run, p in
              (("two", two_params[0]), ("one", one_params))}

    # the counterfactual: one process at batch B over exactly process 0's step batches (the data file is
    # laid out so that the loader's own shuffle yields them), i.e. process 0 without gradient averaging
    order = loader_batches(STEPS * B, B)
    layout = [None] * (STEPS * B)
    for i in range(STEPS):
        for pos, j in zip(order[i], shards[i][0]):
            layout[pos] = records[j]
    (tmp_path / "data" / "half.json").write_text(json.dumps(layout))
    run([sys.executable, str(script), str(tmp_path / "data" / "half.json"), images, str(tmp_path / "half"), str(B),
         str(STEPS), aux], env, tmp_path)
    half_log, (half_rank,), (half_params,) = read_run(tmp_path / "half", 1)
    assert half_rank["seen"][:STEPS * B] == two_ranks[0]["seen"][:STEPS * B]
    assert half_log[0]["loss"] == pytest.approx(float(per_process[0]["ce"]), rel=1e-5)
    change["half"] = torch.cat([(half_params[k] - init[k]).flatten() for k in keys])

    # AdamW's first steps are about lr * sign(gradient) per element, so ||change|| ~ lr * sqrt(#params)
    # and rounding (~1e-7 relative) moves it by ~1e-7 (measured: 2e-6) unless a gradient within rounding
    # of 0 flips sign: that element moves by 2 lr, ~1.2% of ||change||. 2% allows one such flip. Without
    # the averaging, each process follows its own half and lands ~80% away (measured): the counterfactual
    # must be more than 25% away, and 10x further than the two-process run.
    d_two, d_half = rel(change["two"], change["one"]), rel(change["half"], change["one"])
    assert d_two < 0.02, d_two
    assert d_half > 0.25, d_half
    assert d_half > 10 * d_two
