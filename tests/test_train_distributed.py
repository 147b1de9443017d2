"""Training scales the way users run it: `accelerate launch` over 2 processes at batch B per process is
one process at batch 2B, under DDP and under FSDP (FSDP2), for MoE-LLaVA and for RoE, on the tiny model,
CPU, gloo. An FSDP checkpoint written by 2 processes resumes in 1.

Exact equality is impossible: floating-point sums run in another order (and the batches are padded
to other widths), so the comparison is within tolerances stated where they are asserted. What makes
the runs comparable at all:

* the data: the loop's DataLoader shuffles with `Generator().manual_seed(seed)`; accelerate
  (split_batches=False) shards its batches of size B, process k taking batches k, k+2, ... So the
  one-process batch i of size 2B (the same permutation cut into 2B) holds exactly process 0's and
  process 1's step-i batches: checked from the examples each process actually read. N = 4 steps x 2 x B
  examples: one epoch, nothing dropped.
* the loss: MoE-LLaVA's token-mean CE per process, averaged over the processes, equals the token-mean
  CE over the combined batch only if both halves hold as many answer tokens; every answer here is 5
  characters + the end token (6 tokens), so it does. RoE's loss is a mean over samples (each sample's
  CE and hinge), so it is the mean of the halves' whatever their lengths.
* l_aux is per process (as in MoE-LLaVA's DeepSpeed reference): E * sum_e mean_prob_e * frac_top1_e
  over a process's tokens is not linear in the batch, so its mean over 2 processes is not its value
  over the combined batch. The runs use aux_loss_coef = 0 (l_aux is still computed and logged: the
  test checks the logged value is the mean of the per-process values, and what it is over 2B).
* expert 2's Gumbel noise is drawn per process over that process's tokens, and RoE's stage 0 draws
  random routes per process: the noise is switched off (in every run) by the launched script, and the
  RoE runs start in stage 1 (stage 2, where the backbone trains as well, from step 2; soft routes, as a
  hard route flips on rounding). capacity_factor_train = E / 2: no token is dropped.
* MoE: 16 experts, so that some expert gets no token in one process at some step while the other's
  tokens reach it, and some gets none in either (checked from the experts each process routed to). DDP
  (find_unused_parameters) and FSDP (a zero gradient in the reduce-scatter) count the first process as
  0; the loop gives the second a zero gradient in every mode (one process included), as FSDP must.

The counterfactual run that shows the tolerances would catch missing averaging: one process at batch B
over exactly process 0's step batches, i.e. what process 0 computes when its gradients are its own.
Figures measured by these tests go to tests/artifacts/distributed_figures.json (docs/distributed.md).
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
B, STEPS = 2, 4
N = STEPS * 2 * B            # one epoch of 2 x B per step
QUESTIONS = ["What colour is the circle?", "How many?", "Is there a large red square left of the small blue circle?",
             "Where is it?", "What shape is on the left?", "Any cubes?", "Count the circles.", "Is the big one red?",
             "Which is larger?", "Colour?", "What is next to the square?", "How many blue shapes are there?",
             "Is the cube behind the sphere?", "Size?", "What material is the small thing?", "Left or right?"]
FIGURES = REPO / "tests" / "artifacts" / "distributed_figures.json"

SCRIPT = r'''
"""A few training steps, as a user runs them: `python this.py ...` or `accelerate launch this.py ...`.
args: system (moe | roe) data.json images_folder out_folder batch_size steps options_json"""
import json
import sys
from pathlib import Path

import torch

import roe_core.systems.moe_llava as moe
from roe_core.runtime.conversation import ConversationEncoder
from roe_core.runtime.tiny import tiny_llava
from roe_core.train.loop import LlavaJsonDataset, gather_state


def build_model(system, opts):
    """The tiny base and the system's fresh parts, the same in every process and run; returns (model,
    encoder, names of the parameters that train)."""
    base, tok, proc = tiny_llava(seed=0)
    enc = ConversationEncoder.for_model(base, tok, proc)
    torch.manual_seed(0)
    if system == "roe":
        from roe_core.systems.roe import RoEModel
        model = RoEModel(base)
        trained = {id(p) for p in model.roe_parameters()} | {id(p) for p in model.lm.parameters()}
    else:
        # parts stored as rank-2 deltas (experts and dense FFNs); experts that differ from the start, so
        # the routers' CE gradient is real
        E = opts.get("experts", 4)       # capacity E/2 x tokens / E x 2 = every token: none is dropped
        model = moe.MoELlavaModel(base, num_experts=E, expert_delta_rank=2, dense_delta_rank=2,
                                  capacity_factor_train=max(2.0, E / 2), capacity_factor_eval=max(2.0, E / 2),
                                  aux_loss_coef=opts.get("aux", 0.0))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for ffn in model.moe.values():
                for e in ffn.experts:
                    for d in e.delta.values():
                        d.b.copy_(torch.randn(d.b.shape, generator=g) * 0.3)
        trained = {id(p) for p in model.ffn_parameters()}
    names = [n for n, p in model.named_parameters() if id(p) in trained]
    return model, enc, names


class Logged(torch.utils.data.Dataset):
    """A dataset recording the images of the examples this process reads (num_workers=0: in this process)."""

    def __init__(self, ds):
        self.ds, self.seen = ds, []

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        self.seen.append(self.ds.items[i][0])
        return self.ds[i]


def record_expert_use(model, calls):
    """calls[k] = per MoE layer, for the k-th forward of this process: tokens routed to each expert (kept)."""
    def hook(module, args, out):
        if module.training and torch.is_grad_enabled():
            g = out[1]
            counts = torch.bincount(g.experts[g.kept], minlength=module.num_experts)
            calls.append(counts.tolist())
    for ffn in model.moe.values():
        ffn.register_forward_hook(hook)


def main():
    torch.set_num_threads(1)
    from accelerate import PartialState
    from safetensors.torch import save_file

    system, data, images, out = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])
    batch_size, steps, opts = int(sys.argv[5]), int(sys.argv[6]), json.loads(sys.argv[7])
    top2 = moe.top2_gating       # expert 2's Gumbel noise off (it is drawn per process over its own tokens)
    moe.top2_gating = lambda logits, cf, training, gen=None, mask=None: top2(logits, cf, False, gen, mask)
    model, enc, names = build_model(system, opts)
    ds = Logged(LlavaJsonDataset(data, images))
    common = dict(steps=steps, batch_size=batch_size, log_every=1, save_every=opts.get("save_every", 10_000), seed=0,
                  activation_checkpointing=opts.get("ac", False), bf16=opts.get("bf16", False))
    calls = []
    if system == "roe":
        from roe_core.train.roe import TrainConfig, train
        cfg = TrainConfig(**common, lr=1e-3, backbone_lr=1e-3, stage1_start=0.0,
                          stage2_start=opts.get("stage2_start", 0.5), t_decay=opts.get("t_decay", 0.95),
                          hard_routes=False)
        train(model, enc, ds, cfg, out, resume=opts.get("resume", False), progress=False)
    else:
        from roe_core.train.moe_llava import MoETuneConfig, train_moe_llava
        record_expert_use(model, calls)
        cfg = MoETuneConfig(**common, lr=1e-3)
        train_moe_llava(model, enc, ds, cfg, out, resume=opts.get("resume", False), progress=False)
    state = PartialState()
    rank = state.process_index
    # every process gathers the full parameters (under FSDP each holds shards only)
    save_file({n: t.contiguous() for n, t in gather_state(model, names, keep=True).items()},
              str(out / f"params_rank{rank}.safetensors"))
    from torch.distributed.tensor import DTensor
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
    (out / f"rank{rank}.json").write_text(json.dumps({
        "seen": ds.seen, "num_processes": state.num_processes, "backend": backend, "expert_use": calls,
        "device": str(state.device),
        "sharded": any(isinstance(p, DTensor) for p in model.parameters())}))


if __name__ == "__main__":
    main()
'''
MOE = {"experts": 16, "aux": 0.0}
ROE = {"stage2_start": 0.5}


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
           if not k.startswith(("ACCELERATE_", "FSDP_")) and k not in (
               "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               CUDA_VISIBLE_DEVICES="",              # CPU processes (two processes on one GPU would fail in NCCL)
               HF_HOME=str(tmp_path / "hf"))         # no user `accelerate config` file changes the launch
    return env


class Runner:
    """Runs the script once per (data, mode, batch, options) into its own folder."""

    def __init__(self, root: Path, free_port):
        self.root, self.free_port = root, free_port
        self.records = make_data(root / "data")
        self.data, self.images = str(root / "data" / "train.json"), str(root / "data" / "images")
        self.script = root / "train_script.py"
        self.script.write_text(SCRIPT)
        self.env = clean_env(root)

    def launch(self, mode: str, system: str, out: Path, batch_size: int, steps: int, opts: dict,
               data: str | None = None, gpu: bool = False) -> None:
        """mode: one (python), ddp or fsdp (accelerate launch with configs/ddp8.yaml or fsdp8.yaml, 2 CPU
        processes)."""
        args = [system, data or self.data, self.images, str(out), str(batch_size), str(steps), json.dumps(opts)]
        if mode == "one":
            cmd = [sys.executable, str(self.script), *args]
        else:
            # the repository's 8-GPU configs on 2 processes. accelerate 1.15: `--cpu --num_processes 2` starts
            # ONE process (its multi-CPU path wants mpirun); a MULTI_GPU or FSDP config starts 2 through
            # torchrun, and the loop's Accelerator(cpu=True) (no CUDA here) runs them on gloo; for FSDP the
            # loop shards the model itself, as it does on GPUs
            config = REPO / "configs" / ("ddp8.yaml" if mode == "ddp" else "fsdp8.yaml")
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                   "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--num_cpu_threads_per_process", "1", "--main_process_port", str(self.free_port()),
                   str(self.script), *args]
        env = {k: v for k, v in self.env.items() if not (gpu and k == "CUDA_VISIBLE_DEVICES")}
        p = subprocess.run(cmd, env=env, cwd=self.root, capture_output=True, text=True, timeout=240)
        if p.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")

    def module(self):
        spec = importlib.util.spec_from_file_location("train_script", self.script)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod


def read_run(out: Path, processes: int) -> tuple[list[dict], list[dict], list[dict]]:
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    ranks = [json.loads((out / f"rank{k}.json").read_text()) for k in range(processes)]
    params = [load_file(str(out / f"params_rank{k}.safetensors")) for k in range(processes)]
    return log, ranks, params


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def change(params: dict, init: dict, keys: list[str]) -> torch.Tensor:
    return torch.cat([(params[k] - init[k]).flatten() for k in keys])


def record(name: str, figures: dict) -> None:
    """Adds a run's measured figures to tests/artifacts/distributed_figures.json (docs/distributed.md)."""
    FIGURES.parent.mkdir(parents=True, exist_ok=True)
    all_ = json.loads(FIGURES.read_text()) if FIGURES.is_file() else {}
    all_[name] = figures
    FIGURES.write_text(json.dumps(all_, indent=1))


@pytest.fixture(scope="module")
def runner(tmp_path_factory, free_port):
    return Runner(tmp_path_factory.mktemp("distributed"), free_port)


@pytest.fixture(scope="module")
def one_process(runner):
    """The reference: one process at batch 2B, per system (run once for the module)."""
    done = {}

    def get(system: str):
        if system not in done:
            out = runner.root / f"one_{system}"
            runner.launch("one", system, out, 2 * B, STEPS, MOE if system == "moe" else ROE)
            done[system] = read_run(out, 1)
        return done[system]
    return get


def check_same_examples(runner, two_ranks, one_rank) -> list[list[list[int]]]:
    """The one-process batch i is the two processes' step-i batches together; returns [step][process] shards."""
    name = [r["image"] for r in runner.records]
    small, large = loader_batches(N, B), loader_batches(N, 2 * B)
    assert all(large[i] == small[2 * i] + small[2 * i + 1] for i in range(STEPS))
    for k, r in enumerate(two_ranks):
        assert r["seen"][:STEPS * B] == [name[j] for i in range(STEPS) for j in small[2 * i + k]]
    assert one_rank["seen"][:STEPS * 2 * B] == [name[j] for i in range(STEPS) for j in large[i]]
    return [[small[2 * i + k] for k in range(2)] for i in range(STEPS)]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_moe_llava_two_processes_at_batch_b_equal_one_process_at_batch_2b(runner, one_process, mode):
    out = runner.root / f"{mode}_moe"
    runner.launch(mode, "moe", out, B, STEPS, MOE)
    two_log, two_ranks, two_params = read_run(out, 2)
    one_log, (one_rank,), (one_params,) = one_process("moe")
    assert [r["num_processes"] for r in two_ranks] == [2, 2] and {r["backend"] for r in two_ranks} == {"gloo"}
    assert [r["sharded"] for r in two_ranks] == [mode == "fsdp"] * 2 and not one_rank["sharded"]
    assert [row["step"] for row in two_log] == [row["step"] for row in one_log] == list(range(1, STEPS + 1))
    shards = check_same_examples(runner, two_ranks, one_rank)

    # some expert got no token in one process while the other process's tokens reached it (a step, a layer)
    use = [[torch.tensor(c) for c in r["expert_use"]] for r in two_ranks]     # [process][forward = step x layer]
    one_use = [torch.tensor(c) for c in one_rank["expert_use"]]
    assert len(use[0]) == len(use[1]) == len(one_use)
    lopsided = sum(int(((a == 0) & (b > 0)).sum() + ((b == 0) & (a > 0)).sum()) for a, b in zip(*use))
    unused = sum(int(((a + b) == 0).sum()) for a, b in zip(*use))
    assert lopsided > 0, "no expert was used by one process only: the test would not exercise it"
    assert unused > 0, "every expert was used at every step: the test would not exercise an unused one"
    layers = len(use[0]) // STEPS           # step 0 (the same weights): the same routing of the same tokens
    assert all(torch.equal(a + b, c) for a, b, c in list(zip(*use, one_use))[:layers])

    # --- the first logged loss (before any update): CE over 2 x 6 answer tokens per process, averaged,
    # is the CE over the 24 of the combined batch. The same examples through the same weights: only
    # the summation order and the padding width differ (~1e-7 relative in fp32): 1e-5
    mod = runner.module()
    from roe_core.systems.moe_llava import moe_lm_loss
    from roe_core.train.loop import LlavaJsonDataset, make_collate
    model, enc, keys = mod.build_model("moe", MOE)
    model.eval()              # = training mode at step 0 here: no drops at either capacity, no noise, no dropout
    ds, collate = LlavaJsonDataset(runner.data, runner.images), make_collate(enc)
    large = loader_batches(N, 2 * B)
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
    loss_rel = [abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(two_log, one_log)]
    assert max(loss_rel) < 1e-4, loss_rel

    # --- the parameters after the steps
    assert sorted(one_params) == sorted(two_params[0]) == sorted(two_params[1]) == sorted(keys) and len(keys) > 50
    # averaged (DDP) or reduce-scattered and gathered (FSDP) gradients: both processes hold the same numbers
    assert all(torch.equal(two_params[0][k], two_params[1][k]) for k in keys)
    # the checkpoint the main process wrote holds them (gathered under FSDP)
    saved = load_file(str(out / "moe.safetensors"))
    assert set(saved) <= set(keys) and all(torch.equal(saved[k], two_params[0][k]) for k in saved)
    init = {n: p.detach() for n, p in model.named_parameters()}
    d_two = rel(change(two_params[0], init, keys), change(one_params, init, keys))
    max_abs = max(float((two_params[0][k] - one_params[k]).abs().max()) for k in keys)
    figures = {"first_loss": [two_log[0]["loss"], one_log[0]["loss"]], "max_loss_rel_diff": max(loss_rel),
               "param_change_rel_diff": d_two, "max_abs_param_diff": max_abs, "lr": 1e-3, "steps": STEPS,
               "experts_used_by_one_process_only": lopsided, "experts_used_by_neither": unused}
    record(f"moe_llava_{mode}", figures)
    # AdamW's first steps are about lr * sign(gradient) per element, so ||change|| ~ lr * sqrt(#params)
    # and rounding (~1e-7 relative) moves it by ~1e-7 (measured: 2e-6) unless a gradient within rounding
    # of 0 flips sign: that element moves by 2 lr, ~1.2% of ||change||. 2% allows one such flip.
    assert d_two < 0.02, figures

    if mode == "ddp":
        # the counterfactual: one process at batch B over exactly process 0's step batches (the data file is
        # laid out so that the loader's own shuffle yields them), i.e. process 0 without gradient averaging.
        # It lands far away (measured: ~80%): more than 25%, and 10x further than the two-process run.
        order = loader_batches(STEPS * B, B)
        layout = [None] * (STEPS * B)
        for i in range(STEPS):
            for pos, j in zip(order[i], shards[i][0]):
                layout[pos] = runner.records[j]
        half_data = runner.root / "data" / "half.json"
        half_data.write_text(json.dumps(layout))
        runner.launch("one", "moe", runner.root / "half_moe", B, STEPS, MOE, data=str(half_data))
        half_log, (half_rank,), (half_params,) = read_run(runner.root / "half_moe", 1)
        assert half_rank["seen"][:STEPS * B] == two_ranks[0]["seen"][:STEPS * B]
        assert half_log[0]["loss"] == pytest.approx(float(per_process[0]["ce"]), rel=1e-5)
        d_half = rel(change(half_params, init, keys), change(one_params, init, keys))
        record("moe_llava_without_averaging", {"param_change_rel_diff": d_half})
        assert d_half > 0.25, d_half
        assert d_half > 10 * d_two


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_roe_two_processes_at_batch_b_equal_one_process_at_batch_2b(runner, one_process, mode):
    """RoE: stage 1 (adapters, routers, routing tokens) for 2 steps, then stage 2 (+ the backbone) for 2:
    the parameters that train change between steps, under DDP and FSDP as in one process."""
    out = runner.root / f"{mode}_roe"
    runner.launch(mode, "roe", out, B, STEPS, ROE)
    two_log, two_ranks, two_params = read_run(out, 2)
    one_log, (one_rank,), (one_params,) = one_process("roe")
    assert [r["sharded"] for r in two_ranks] == [mode == "fsdp"] * 2
    assert [row["stage"] for row in one_log] == [1, 1, 2, 2] == [row["stage"] for row in two_log]
    shards = check_same_examples(runner, two_ranks, one_rank)

    # the first loss: a mean over samples, so the mean of the two halves' losses
    mod = runner.module()
    from roe_core.train.loop import LlavaJsonDataset, make_collate
    from roe_core.train.roe import RoEObjective, TrainConfig
    model, enc, keys = mod.build_model("roe", ROE)
    ds, collate = LlavaJsonDataset(runner.data, runner.images), make_collate(enc)
    objective = RoEObjective(model, TrainConfig(steps=STEPS, stage1_start=0.0, stage2_start=0.5, hard_routes=False))
    with torch.no_grad():
        halves = [float(objective.loss(model, collate([ds[j] for j in shard]), 0)["loss"]) for shard in shards[0]]
    assert two_log[0]["loss"] == pytest.approx(sum(halves) / 2, rel=1e-5)
    loss_rel = [abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(two_log, one_log)]
    assert loss_rel[0] < 1e-5 and max(loss_rel) < 1e-4, loss_rel

    assert sorted(one_params) == sorted(two_params[0]) == sorted(keys)
    assert all(torch.equal(two_params[0][k], two_params[1][k]) for k in keys)
    parts = load_file(str(out / "roe.safetensors"))
    backbone = load_file(str(out / "backbone.safetensors"))
    assert set(parts) | set(backbone) == set(keys)
    assert all(torch.equal(t, two_params[0][k]) for d in (parts, backbone) for k, t in d.items())
    init = {n: p.detach() for n, p in model.named_parameters()}
    figures = {}
    for what, names in (("parts", sorted(parts)), ("backbone", sorted(backbone))):
        moved = change(one_params, init, names)
        assert moved.norm() > 0, what
        figures[f"{what}_change_rel_diff"] = rel(change(two_params[0], init, names), moved)
        figures[f"{what}_max_abs_diff"] = max(float((two_params[0][k] - one_params[k]).abs().max()) for k in names)
    figures.update(first_loss=[two_log[0]["loss"], one_log[0]["loss"]], max_loss_rel_diff=max(loss_rel), lr=1e-3,
                   steps=STEPS)
    record(f"roe_{mode}", figures)
    # as for MoE-LLaVA (AdamW moves each element by ~lr): within 2% of the one-process change
    assert figures["parts_change_rel_diff"] < 0.02 and figures["backbone_change_rel_diff"] < 0.02, figures


def test_fsdp_checkpoint_from_two_processes_resumes_in_one(runner):
    """RoE in stage 2 throughout (backbone trains; a constant temperature, so the schedule does not depend
    on the number of steps): 2 FSDP processes train 2 steps and save (parts and backbone gathered, AdamW
    sharded with DCP); one process resumes from that checkpoint and trains 2 more. It starts from the same
    parameters and ends where one process training all 4 steps ends."""
    opts = {"stage2_start": 0.0, "t_decay": 1.0, "save_every": 2}
    ckpt = runner.root / "resume"
    runner.launch("fsdp", "roe", ckpt, B, 2, opts)
    _, _, (saved_params, _) = read_run(ckpt, 2)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["optimizer"] == "optimizer/"
    assert not (ckpt / "optimizer.safetensors").exists() and any((ckpt / "optimizer").glob("*.distcp"))
    # the files hold the gathered parameters: a fresh model loading them in one process has exactly them
    mod = runner.module()
    from roe_core.train.loop import load_parameters
    from roe_core.train.roe import RoEObjective, TrainConfig
    model, _, keys = mod.build_model("roe", opts)
    assert load_parameters(ckpt, model, RoEObjective(model, TrainConfig(backbone_lr=1e-3))) == 2
    named = dict(model.named_parameters())
    assert all(torch.equal(named[k].detach(), saved_params[k]) for k in keys)

    runner.launch("one", "roe", ckpt, 2 * B, STEPS, {**opts, "resume": True})
    runner.launch("one", "roe", runner.root / "straight", 2 * B, STEPS, opts)
    resumed_log, _, (resumed,) = read_run(ckpt, 1)
    straight_log, _, (straight,) = read_run(runner.root / "straight", 1)
    assert [r["step"] for r in resumed_log] == [1, 2, 3, 4] == [r["step"] for r in straight_log]
    loss_rel = [abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(resumed_log, straight_log)]
    init = {n: p.detach() for n, p in mod.build_model("roe", opts)[0].named_parameters()}
    d = rel(change(resumed, init, keys), change(straight, init, keys))
    record("roe_fsdp2_resumed_in_one", {"max_loss_rel_diff": max(loss_rel), "param_change_rel_diff": d,
                                        "max_abs_param_diff": max(float((resumed[k] - straight[k]).abs().max())
                                                                  for k in keys)})
    assert max(loss_rel) < 1e-4, loss_rel
    # the moments came back: without them (a fresh AdamW at step 2) the change differs by tens of percent
    assert d < 0.02, d


def test_fully_shard_trains_a_small_model_over_gloo(tmp_path, free_port):
    """torch's FSDP2 on its own (fully_shard per layer, then the root), 2 CPU processes over gloo: the same
    steps as one process over the combined batch (the premise the loop's FSDP path rests on)."""
    script = tmp_path / "fsdp2.py"
    script.write_text(r'''
import sys
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 3))


def train(m, rank, world):
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
        n = 8 // world
        ((m(x[rank * n:(rank + 1) * n]) - y[rank * n:(rank + 1) * n]) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    return m


torch.set_num_threads(1)
if sys.argv[1] == "fsdp":
    dist.init_process_group("gloo")
    m = model()
    for layer in (m[0], m[2], m[4]):
        fully_shard(layer)
    fully_shard(m)
    m = train(m, dist.get_rank(), dist.get_world_size())
    full = {k: v.full_tensor() for k, v in m.state_dict().items()}
    if dist.get_rank() == 0:
        torch.save(full, sys.argv[2])
    dist.barrier()                  # neither process closes its connections while the other still uses them
    dist.destroy_process_group()
else:
    torch.save(train(model(), 0, 1).state_dict(), sys.argv[2])
''')
    env = clean_env(tmp_path)
    for cmd in ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                 "--master_port", str(free_port()), str(script), "fsdp", str(tmp_path / "two.pt")],
                [sys.executable, str(script), "one", str(tmp_path / "one.pt")]):
        p = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-6000:]
    two, one = torch.load(tmp_path / "two.pt"), torch.load(tmp_path / "one.pt")
    assert two.keys() == one.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("system", ["roe", "moe"])
def test_activation_checkpointing_recomputes_and_changes_nothing(runner, system, tmp_path):
    """--activation-checkpointing: the checkpointed modules run again in backward (RoE: the decoder
    layers; MoE-LLaVA: each layer's attention and FFN, which it calls one by one), and the training is
    the same numbers."""
    from roe_core.train.loop import LlavaJsonDataset
    from roe_core.train.moe_llava import MoETuneConfig, train_moe_llava
    from roe_core.train.roe import TrainConfig, train
    mod = runner.module()
    opts = MOE if system == "moe" else ROE
    ds = LlavaJsonDataset(runner.data, runner.images)
    runs = {}
    for ac in (False, True):
        model, enc, names = mod.build_model(system, opts)
        calls = []
        # inside what is recomputed (the last layer: attention there is on the gradient's path in both systems)
        model.layers[-1].self_attn.q_proj.register_forward_hook(lambda *a: calls.append(1))
        common = dict(steps=2, batch_size=4, log_every=1, save_every=100, activation_checkpointing=ac)
        if system == "roe":
            log = train(model, enc, ds, TrainConfig(**common, lr=1e-3, backbone_lr=1e-3, stage1_start=0.0,
                                                    stage2_start=0.5, hard_routes=False), tmp_path / str(ac),
                        progress=False)
        else:
            log = train_moe_llava(model, enc, ds, MoETuneConfig(**common, lr=1e-3), tmp_path / str(ac), progress=False)
        named = dict(model.named_parameters())
        runs[ac] = (len(calls), [r["loss"] for r in log], {n: named[n].detach().clone() for n in names})
    assert runs[False][0] == 2 and runs[True][0] == 4            # one forward per step, plus the recompute
    assert runs[True][1] == runs[False][1]
    assert all(torch.equal(runs[True][2][n], runs[False][2][n]) for n in runs[False][2])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_roe_steps_on_cuda_in_bf16(runner):
    """A few RoE steps (stage 1, then stage 2 with the backbone) on the GPU under bf16 autocast, with
    activation checkpointing: the same first loss as fp32 on the CPU (bf16's precision), a falling-or-
    finite curve, trained parameters that moved and a checkpoint written."""
    opts = {**ROE, "bf16": True, "ac": True}
    runner.launch("one", "roe", runner.root / "cuda_bf16", 2 * B, STEPS, opts, gpu=True)
    log, (rank,), (params,) = read_run(runner.root / "cuda_bf16", 1)
    assert rank["device"].startswith("cuda")
    runner.launch("one", "roe", runner.root / "cpu_fp32", 2 * B, STEPS, ROE)
    ref, _, _ = read_run(runner.root / "cpu_fp32", 1)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log) and [r["stage"] for r in log] == [1, 1, 2, 2]
    assert log[0]["loss"] == pytest.approx(ref[0]["loss"], rel=2e-2)
    init = {n: p.detach() for n, p in runner.module().build_model("roe", ROE)[0].named_parameters()}
    backbone = [k for k in params if k.startswith("base.")]
    parts = [k for k in params if not k.startswith("base.")]
    # (a layer the routers learn to skip fully, w_skip = 1 in bf16, gets no gradient: the backbone as a whole)
    assert change(params, init, parts).abs().max() > 0 and change(params, init, backbone).abs().max() > 0
    assert (runner.root / "cuda_bf16" / "roe.safetensors").is_file()


def test_the_configs_are_accelerate_configs():
    """configs/: one GPU, 8-GPU DDP, 8-GPU FSDP2 (the loop's units: no auto-wrap policy), DeepSpeed ZeRO-3
    (an untested reference the loop refuses)."""
    from accelerate.commands.config.config_args import load_config_from_file
    got = {f.stem: load_config_from_file(str(f)) for f in sorted((REPO / "configs").glob("*.yaml"))}
    assert {k: (str(c.distributed_type).split(".")[-1], c.num_processes) for k, c in got.items()} == {
        "one_gpu": ("NO", 1), "ddp8": ("MULTI_GPU", 8), "fsdp8": ("FSDP", 8), "deepspeed_zero3": ("DEEPSPEED", 8)}
    fsdp = got["fsdp8"].fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_auto_wrap_policy"] == "NO_WRAP"
    assert got["deepspeed_zero3"].deepspeed_config["zero_stage"] == 3


def test_memory_plan_counts_what_each_stage_trains():
    """train/memory.py on the tiny preset: the parameter counts are the model's (RoE parts: a router
    Linear(2d -> 2) and an adapter (RMSNorm, d -> d/4 -> d) per layer, two routing tokens), each stage's
    states are 4 + 4 + 8 bytes per trained parameter over 4 per weight, FSDP divides them, and the
    activations were measured (with activation checkpointing: less)."""
    from roe_core.train.memory import PRESETS, format_plan, plan
    p = PRESETS["tiny"]
    d, L, r = p["hidden"], p["layers"], p["hidden"] // 4
    r_ = plan("tiny", gpus=4, seq=100, batch=2)
    c = r_["counts"]
    assert c.parts == L * (2 * d * 2 + d + 2 * d * r) + 2 * d
    parts, backbone, lora = r_["rows"]
    assert parts["trained"] == c.parts and backbone["trained"] == c.parts + c.lm
    for row, unit_trained in ((parts, c.unit_parts), (backbone, c.max_unit)):
        assert row["weights"] == 4 * c.total and row["one_gpu"] == 4 * c.total + 12 * row["trained"]
        # sharded states, two units gathered (fp32), one unit's gradients, the root
        assert row["fsdp_gpu"] == row["one_gpu"] / 4 + 2 * 4 * c.max_unit + 4 * unit_trained + 4 * c.root
        assert 0 < row["act_ac"] < row["act"]
    assert lora["trained"] == c.parts + c.lora > parts["trained"]
    assert "| 2: + LM backbone" in format_plan(r_)
