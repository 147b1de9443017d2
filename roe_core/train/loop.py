"""The training loop every routing system shares (RoE, MoE-LLaVA, ...), on `accelerate`.

    fit(model, objective, encoder, dataset, cfg, out, resume=False)

A system brings an `Objective`: which parameters train at which step (and at what learning rate),
its loss on a collated batch, and how its own parts are saved and loaded. The loop does the rest
the same way for all of them: data order, accelerate (one process, or several under
`accelerate launch`, gradients averaged), autocast, clipping, the learning-rate schedule,
resumable checkpoints (safetensors + JSON only: the system's parts, the trained base tensors,
AdamW moments, trainer_state.json) and the learning curve (train_log.jsonl, a row every
log_every steps).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..runtime.conversation import IMAGE_PLACEHOLDER, ConversationEncoder
from ..runtime.images import load_image


class Objective(Protocol):
    """What one system's training needs beyond the shared loop."""
    desc: str                                                   # progress-bar label

    def param_groups(self, model: nn.Module) -> list[dict]: ...     # AdamW groups {"params", "lr"}

    def set_trainable(self, model: nn.Module, step: int) -> None: ...

    def loss(self, model: nn.Module, batch, step: int) -> dict[str, Tensor]: ...   # "loss" + logged stats

    def lr_factor(self, step: int) -> float: ...                # multiplies every group's LR

    def save_parts(self, model: nn.Module, out: Path) -> None: ...

    def load_parts(self, model: nn.Module, out: Path) -> None: ...

    def base_tensors(self, model: nn.Module) -> list[str]: ...  # names of trained tensors the parts do not hold

    def row(self, step: int) -> dict: ...                       # extra learning-curve fields of a step

    # optional: after_step(model, step) runs after every optimizer step (e.g. EvoMoE's expert evolution)


@dataclass
class LoopConfig:
    """What the loop itself needs; each system's training config extends it."""
    steps: int = 600
    batch_size: int = 8
    lr: float = 1e-3
    seed: int = 0
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    save_every: int = 100
    log_every: int = 10
    bf16: bool = False


def add_config_args(ap, cls, flags: dict[str, str] | None = None, skip: tuple[str, ...] = ()) -> None:
    """One --option per field of a config dataclass (bool fields in `flags`: store_true with that help)."""
    flags = {"bf16": "bf16 autocast", **(flags or {})}
    for f in cls.__dataclass_fields__.values():
        if f.name in skip:
            continue
        if f.name in flags:
            ap.add_argument("--" + f.name.replace("_", "-"), action="store_true", help=flags[f.name])
        else:
            ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)


def config_from_args(cls, args):
    return cls(**{k: getattr(args, k) for k in cls.__dataclass_fields__})


def cosine_with_warmup(step: int, steps: int, warmup: float = 0.03) -> float:
    """LR factor: linear warm-up over the first `warmup` of training, then cosine to 0."""
    w = max(1, round(warmup * steps))
    if step < w:
        return (step + 1) / w
    return 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, steps - w)))


class TrainableParts:
    """The shared part of an objective in which one set of parameters trains and nothing else, with a
    cosine learning rate after warm-up (cfg.warmup); a subclass brings the loss and its checkpoint files.
    base_names: trained tensors its own checkpoint does not hold (saved in backbone.safetensors)."""
    desc = "training"

    def __init__(self, cfg, params: list, base_names: list[str] = ()):
        self.cfg = cfg
        self.params = params
        self.base_names = list(base_names)

    def param_groups(self, model: nn.Module) -> list[dict]:
        return [{"params": self.params, "lr": self.cfg.lr}]

    def set_trainable(self, model: nn.Module, step: int) -> None:
        if step == 0 or not self.params[0].requires_grad:
            model.requires_grad_(False)
            for p in self.params:
                p.requires_grad_(True)

    def lr_factor(self, step: int) -> float:
        return cosine_with_warmup(step, self.cfg.steps, self.cfg.warmup)

    def row(self, step: int) -> dict:
        return {}

    def base_tensors(self, model: nn.Module) -> list[str]:
        return self.base_names


# --- data ---------------------------------------------------------------------------------------------

class LlavaJsonDataset(Dataset):
    """LLaVA conversation JSON: [{"image": "x.png", "conversations": [{"from": "human", "value":
    "<image>\\nQ"}, {"from": "gpt", "value": "A"}, ...]}, ...]. Records without an image are skipped."""

    def __init__(self, json_path: str | Path, image_folder: str | Path | None = None, max_turns: int = 4):
        records = json.loads(Path(json_path).read_text())
        self.folder = Path(image_folder) if image_folder else Path(json_path).parent
        self.items = []
        for r in records:
            conv = r.get("conversations", [])
            if "image" not in r or len(conv) < 2:
                continue
            turns = []
            for human, gpt in zip(conv[0::2], conv[1::2]):
                if human.get("from") != "human" or gpt.get("from") != "gpt":
                    raise ValueError(f"record {r.get('id')}: turns must alternate human/gpt")
                q = human["value"].replace(IMAGE_PLACEHOLDER, "").strip()
                turns.append((q, gpt["value"].strip()))
            self.items.append((r["image"], turns[:max_turns]))
        if not self.items:
            raise ValueError(f"{json_path}: no usable records (need 'image' and human/gpt 'conversations')")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        image, turns = self.items[i]
        return load_image(self.folder / image), turns


def make_collate(encoder: ConversationEncoder):
    def collate(items):
        images, turns = zip(*items)
        return encoder.collate([encoder.encode(t) for t in turns], list(images))
    return collate


# --- checkpoints ---------------------------------------------------------------------------------------

def save_optimizer(optimizer, named: dict[str, torch.nn.Parameter], path: Path) -> None:
    """AdamW moments as safetensors (keyed by parameter name), step counts in its metadata."""
    names = {id(p): n for n, p in named.items()}
    tensors, steps = {}, {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p)
            if st:
                n = names[id(p)]
                tensors[f"{n}.exp_avg"] = st["exp_avg"].contiguous().cpu()
                tensors[f"{n}.exp_avg_sq"] = st["exp_avg_sq"].contiguous().cpu()
                steps[n] = float(st["step"])
    save_file(tensors, str(path), metadata={"steps": json.dumps(steps)})


def load_optimizer(optimizer, named: dict[str, torch.nn.Parameter], path: Path) -> None:
    with safe_open(str(path), framework="pt") as f:
        for n, s in json.loads(f.metadata()["steps"]).items():
            p = named[n]
            optimizer.state[p] = {"step": torch.tensor(s), "exp_avg": f.get_tensor(f"{n}.exp_avg").to(p.device),
                                  "exp_avg_sq": f.get_tensor(f"{n}.exp_avg_sq").to(p.device)}


def save_checkpoint(out: Path, model: nn.Module, objective: Objective, optimizer, step: int, config: dict,
                    log_tail: dict) -> None:
    """The system's parts, the trained base tensors (backbone.safetensors), AdamW moments, the step."""
    objective.save_parts(model, out)
    named = dict(model.named_parameters())
    base_names = objective.base_tensors(model)
    if base_names:
        save_file({n: named[n].detach().contiguous().cpu() for n in base_names}, str(out / "backbone.safetensors"))
    save_optimizer(optimizer, named, out / "optimizer.safetensors")
    state = {"step": step, "config": config, "last": log_tail}
    (out / "trainer_state.json").write_text(json.dumps(state, indent=1))


def load_checkpoint(out: Path, model: nn.Module, objective: Objective, optimizer) -> int:
    state = json.loads((out / "trainer_state.json").read_text())
    objective.load_parts(model, out)
    if (out / "backbone.safetensors").is_file():
        model.load_state_dict(load_file(str(out / "backbone.safetensors")), strict=False)
    load_optimizer(optimizer, dict(model.named_parameters()), out / "optimizer.safetensors")
    return int(state["step"])


# --- the loop ------------------------------------------------------------------------------------------

@torch.no_grad()
def average_gradients(params: list[nn.Parameter], num_processes: int, bucket_numel: int = 1 << 24) -> None:
    """Replaces each parameter's gradient by its mean over the processes (what DDP does). A process
    where a parameter got no gradient (an MoE expert no token of its batch was routed to) counts as
    0; a parameter no process has a gradient for keeps None (AdamW then skips it, as in one process).
    Every process must pass the same parameters in the same order."""
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    if not params:
        return
    dev = params[0].device
    had = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=dev)
    dist.all_reduce(had)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    groups: dict[tuple, list[nn.Parameter]] = {}
    for p in params:
        groups.setdefault((p.grad.dtype, p.grad.device), []).append(p)
    for group in groups.values():
        start = 0
        while start < len(group):
            bucket, n = [], 0
            while start < len(group) and (not bucket or n + group[start].numel() <= bucket_numel):
                bucket.append(group[start])
                n += group[start].numel()
                start += 1
            grads = [p.grad for p in bucket]
            flat = _flatten_dense_tensors(grads)
            dist.all_reduce(flat)
            flat /= num_processes
            for g, avg in zip(grads, _unflatten_dense_tensors(flat, grads)):
                g.copy_(avg)
    for p, h in zip(params, had.tolist()):
        if h == 0:
            p.grad = None


def fit(model: nn.Module, objective: Objective, encoder: ConversationEncoder, dataset: Dataset, cfg: LoopConfig,
        out: str | Path, resume: bool = False, progress: bool = True) -> list[dict]:
    """Trains `model` in place with `objective`; returns the learning curve (a dict every log_every
    steps). cfg (a LoopConfig or a system's extension of it) is stored in trainer_state.json."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(mixed_precision="bf16" if cfg.bf16 else "no", cpu=not torch.cuda.is_available())
    set_seed(cfg.seed)
    groups = [g for g in objective.param_groups(model) if g["params"]]
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    for g in optimizer.param_groups:
        g["lr0"] = g["lr"]
    start = load_checkpoint(out, model, objective, optimizer) if resume and (out / "trainer_state.json").is_file() else 0

    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, collate_fn=make_collate(encoder),
                        generator=torch.Generator().manual_seed(cfg.seed), drop_last=len(dataset) > cfg.batch_size)
    wrapped, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    core = accelerator.unwrap_model(wrapped)
    core.train()
    epoch_len = len(loader)
    log, history_path = [], out / "train_log.jsonl"
    if start == 0 and accelerator.is_main_process:
        history_path.unlink(missing_ok=True)      # a fresh run starts a fresh learning curve
    bar = tqdm(total=cfg.steps, initial=start, disable=not (progress and accelerator.is_main_process),
               desc=objective.desc, dynamic_ncols=True)
    config = {"type": type(cfg).__name__, **asdict(cfg)}
    step, t_last = start, time.perf_counter()
    while step < cfg.steps:
        epoch, skip = divmod(step, epoch_len)
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        for batch in batches:
            if step >= cfg.steps:
                break
            objective.set_trainable(core, step)
            f = objective.lr_factor(step)
            for g in optimizer.param_groups:
                g["lr"] = g["lr0"] * f
            with accelerator.autocast():
                stats = objective.loss(core, batch, step)
            accelerator.backward(stats["loss"])
            trainable = [p for p in core.parameters() if p.requires_grad]
            if accelerator.num_processes > 1:
                # the loss ran on the unwrapped model (objectives read its attributes), so the DDP
                # wrapper's forward never ran and its hooks do not all-reduce: average here, before clipping
                average_gradients(trainable, accelerator.num_processes)
            if cfg.max_grad_norm:
                accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if hasattr(objective, "after_step"):
                objective.after_step(core, step)
            step += 1
            bar.update(1)
            # logged: the mean over processes (one process: its own values)
            row = {k: float(accelerator.reduce(v.detach().float(), "mean")) if accelerator.num_processes > 1
                   else float(v.detach()) for k, v in stats.items()}
            row.update(step=step, lr_factor=f, **objective.row(step - 1))
            bar.set_postfix({k: f"{v:.3f}" for k, v in row.items() if k not in ("step",)}, refresh=False)
            if step % cfg.log_every == 0 or step == cfg.steps:
                row["s_per_step"] = (time.perf_counter() - t_last) / cfg.log_every
                t_last = time.perf_counter()
                log.append(row)
                if accelerator.is_main_process:
                    with history_path.open("a") as fh:
                        fh.write(json.dumps(row) + "\n")
            if accelerator.is_main_process and (step % cfg.save_every == 0 or step == cfg.steps):
                save_checkpoint(out, core, objective, optimizer, step, config, row)
    bar.close()
    core.eval()
    return log
