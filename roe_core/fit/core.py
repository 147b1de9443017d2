"""fit_parts: RoE's parts and the fixed path's, fitted to a base model's own dense answers (see the
package docstring for the API)."""
from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..systems.roe import RoEConfig, RoEModel, RoEPipeline, generate
from ..systems.static import StaticConfig, StaticModel, StaticPipeline
from . import record, routers, standins

EVIDENCE = ("taylor", "residual", "l1")
ROE_DIR, STATIC_DIR = RoEPipeline.system, StaticPipeline.system     # out_dir/roe, out_dir/<static>
SUMMARY = "fit.json"


@dataclass
class FitConfig:
    n_val: int = 96                  # held-out inputs: the threshold is calibrated on them (never fitted on)
    n_evidence: int = 384            # fit inputs the per-layer evidence is measured on (routers fit on these)
    target_agreement: float = 0.9    # the most skipping at which routed answers equal dense on this share of val
    target_layers: float = 0.0       # > 0: instead, the threshold whose mean layers run on val is nearest this
    evidence: str = "taylor"         # what routers learn to predict (EVIDENCE)
    rank: int = 0                    # stand-in rank r (adapter rank 2r); 0: hidden // 8 (adapters of d/4, as RoE's)
    ridge: float = 1e-4              # stand-ins' ridge, a fraction of the normal equations' mean diagonal
    batch_size: int = 16
    max_new_tokens: int = 24
    calib_steps: int = 6             # bisection steps of the threshold search
    seed: int = 0
    compare: tuple[str, ...] = ()    # other evidence to calibrate beside (the evidence study), and "fixed"
    cache: bool = True               # out_dir/cache: a rerun continues where the last stopped
    base_model: str = ""             # recorded in the parts' configs
    export_answers: bool = False     # also out_dir/own_answers/: the fit inputs with the dense answers, LLaVA JSON

    def __post_init__(self):
        if self.evidence not in EVIDENCE:
            raise ValueError(f"evidence must be one of {EVIDENCE}, not {self.evidence!r}")
        bad = [c for c in self.compare if c not in EVIDENCE + ("fixed",)]
        if bad:
            raise ValueError(f"compare: unknown {bad}; choose from {EVIDENCE + ('fixed',)}")
        if not 0.0 < self.target_agreement <= 1.0:
            raise ValueError("target_agreement must be in (0, 1]")
        self.compare = tuple(self.compare)


def fitted_folders(out_dir: str | Path) -> dict[str, str]:
    """{system name: parts folder} of a finished fit in out_dir (RoE's and the fixed path's); {} when it has none."""
    out = Path(out_dir)
    found = {ROE_DIR: out / ROE_DIR / "roe_config.json", STATIC_DIR: out / STATIC_DIR / "static_config.json"}
    return {name: str(cfg.parent) for name, cfg in found.items() if cfg.is_file()}


def _digest(items, cfg: FitConfig, base) -> str:
    h = hashlib.sha1()
    h.update(json.dumps([cfg.seed, cfg.n_val, cfg.max_new_tokens, base.config.text_config.num_hidden_layers,
                         base.config.text_config.hidden_size, str(next(base.parameters()).dtype)]).encode())
    for im, q in items:
        h.update(q.encode())
        h.update(im.convert("RGB").resize((32, 32)).tobytes())
    p = next(base.parameters())
    h.update(p.detach().flatten()[:256].float().cpu().numpy().tobytes())     # a different base, another cache
    return h.hexdigest()[:16]


def split(n: int, n_val: int, seed: int) -> tuple[list[int], list[int]]:
    """(fit indices, held-out indices): a seeded permutation, the first n_val held out."""
    if n_val >= n:
        raise ValueError(f"{n} inputs leave nothing to fit on with n_val={n_val}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def routed_agreement(model: RoEModel, encoder, items, dense: list[str], route, threshold: float | None,
                     batch_size: int, max_new_tokens: int, checkpoint=None) -> dict:
    """Routed answers on items against the dense ones: agreement, mean and std of layers run."""
    same, layers = [], []
    for start in range(0, len(items), batch_size):
        if checkpoint is not None:
            checkpoint()
        chunk = items[start:start + batch_size]
        convs = [encoder.encode([(q, None)], has_image=True) for _, q in chunk]
        batch = encoder.collate(convs, [im for im, _ in chunk], last_turn_only=True)
        gen = generate(model, batch, route, max_new_tokens, encoder.stop_ids, threshold)
        texts = [encoder.tokenizer.decode(t, skip_special_tokens=True).strip() for t in gen.tokens]
        same += [a == b for a, b in zip(texts, dense[start:start + batch_size])]
        layers += [sum(tr.route) for tr in gen.traces]
    return {"agreement": statistics.mean(same), "mean_layers": statistics.mean(layers),
            "std_layers": statistics.pstdev(layers), "threshold": threshold}


def bisect(evaluate: Callable[[float], dict], ok: Callable[[dict], bool], steps: int, lo: float = 0.0,
           hi: float = 1.0) -> tuple[float, list[dict]]:
    """The largest q in [lo, hi] (more skipping as q grows) with ok(evaluate(q)), by bisection (ok taken
    as true below some q and false above). Returns (q, every point evaluated)."""
    points = []
    for _ in range(steps):
        mid = (lo + hi) / 2
        r = evaluate(mid)
        points.append({"q": mid, **r})
        if ok(r):
            lo = mid
        else:
            hi = mid
    return lo, points


def fit_parts(loaded, inputs: Sequence, out_dir: str | Path, cfg: FitConfig | None = None,
              progress: Callable[[str, int, int], None] | None = None,
              checkpoint: Callable[[], object] | None = None) -> dict:
    """Fits RoE's parts and the fixed path's on `inputs` [(PIL image, question)] (see the package docstring).
    Writes out_dir/roe/, out_dir/<static>/ and out_dir/fit.json; returns the summary."""
    cfg = cfg or FitConfig()
    t_start, cpu_start = time.perf_counter(), time.process_time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = loaded.base
    items = [(im if hasattr(im, "convert") else _open(im), str(q)) for im, q in inputs]
    if any(not q.strip() for _, q in items):
        raise ValueError("an input has an empty question")
    fit_idx, val_idx = split(len(items), cfg.n_val, cfg.seed)
    fit_items, val_items = [items[i] for i in fit_idx], [items[i] for i in val_idx]
    text = base.config.text_config
    L, d = text.num_hidden_layers, text.hidden_size
    rank = cfg.rank or max(1, d // 8)
    torch.manual_seed(cfg.seed)
    model = RoEModel(base, RoEConfig(base_model=cfg.base_model or str(loaded.info.get("model", "")), num_layers=L,
                                     hidden_size=d, adapter_rank=2 * rank, router_bias=True, threshold=0.5))
    model.eval()
    encoder = RoEPipeline.make_encoder(loaded)
    key = _digest(items, cfg, base)
    cache = out / "cache" if cfg.cache else None
    times = {}

    # 1. dense answers, router inputs, L1 and the normal equations (fit inputs); dense answers on val
    t0 = time.perf_counter()
    dense, moments = record.dense_pass(model, encoder, fit_items, cfg.batch_size, cfg.max_new_tokens, True,
                                       cache and cache / "fit", key, progress, checkpoint, "dense answers (fit)")
    val, _ = record.dense_pass(model, encoder, val_items, cfg.batch_size, cfg.max_new_tokens, False,
                               cache and cache / "val", key, progress, checkpoint, "dense answers (held out)")
    times["dense_pass_s"] = time.perf_counter() - t0

    # 2. stand-ins: rank-r least squares per layer, into the adapters
    t0 = time.perf_counter()
    explained = []
    for i in range(L):
        down, up = standins.solve(moments.ntn[i], moments.ntd[i], rank, cfg.ridge)
        standins.write_adapter(model.adapters[i], down.to(moments.ntn.device), up.to(moments.ntn.device))
        explained.append(standins.explained(moments, i, down.to(moments.ntn.device), up.to(moments.ntn.device)))
        if checkpoint is not None:
            checkpoint()
    times["standins_s"] = time.perf_counter() - t0

    # 3. evidence of what each layer is worth to each example
    t0 = time.perf_counter()
    n_ev = min(cfg.n_evidence, dense.n)
    kinds = {cfg.evidence, *[c for c in cfg.compare if c != "fixed"]}
    ev: dict[str, torch.Tensor] = {}
    if kinds & {"taylor", "residual"}:
        ev.update(record.evidence_pass(model, encoder, fit_items[:n_ev], dense.answers[:n_ev], cfg.batch_size,
                                       cache and cache / "fit", f"{key}-{rank}-{cfg.ridge}", progress, checkpoint))
    ev["l1"] = dense.l1_all()
    times["evidence_s"] = time.perf_counter() - t0

    # 4. routers on the chosen evidence; 5. the threshold on val
    t0 = time.perf_counter()
    feats, val_feats = dense.features().float(), val.features().float()
    studies = {}
    for kind in [cfg.evidence] + [k for k in cfg.compare if k not in (cfg.evidence, "fixed")]:
        studies[kind] = _route_study(model, encoder, kind, ev.get(kind), feats, val_feats, val_items, val.answers,
                                     cfg, progress, checkpoint, cache)
    main = studies[cfg.evidence]
    routers.write_routers(model, main["fit"], main["a"], main["c"])
    model.config.threshold = main["threshold"]
    times["routers_and_threshold_s"] = time.perf_counter() - t0

    # 6. the fixed path at the same mean layers: the layers least worth on average, the same stand-ins
    mean_cost = ev[cfg.evidence].float().mean(0).tolist() if cfg.evidence != "l1" else ev["l1"].float().mean(0).tolist()
    k = max(0, min(L - 1, round(L - main["mean_layers"])))
    order = sorted(range(L), key=lambda i: (mean_cost[i], i))
    skipped = sorted(order[:k])
    static = StaticModel(base, StaticConfig(base_model=model.config.base_model, num_layers=L, hidden_size=d,
                                            adapter_rank=2 * rank, skipped=skipped, metric=f"fit:{cfg.evidence}",
                                            layer_scores=mean_cost))
    with torch.no_grad():
        for i in skipped:
            static.adapters[str(i)].load_state_dict(model.adapters[i].state_dict())

    summary = {
        "n_inputs": len(items), "n_fit": len(fit_items), "n_val": len(val_items),
        "n_evidence": dense.n if cfg.evidence == "l1" else n_ev,          # l1 comes from the dense pass: every fit input
        "evidence": cfg.evidence, "target_agreement": cfg.target_agreement, "target_layers": cfg.target_layers,
        "threshold": main["threshold"],
        "val_agreement": main["agreement"], "val_mean_layers": main["mean_layers"], "val_std_layers": main["std_layers"],
        "num_layers": L, "stand_in_rank": rank, "adapter_rank": 2 * rank,
        "stand_in_explained": explained, "router_r2_gcv": main["fit"]["r2"],
        "static_k": k, "static_skipped": skipped,
        "studies": {kk: {x: v for x, v in s.items() if x != "fit"} for kk, s in studies.items()},
        "seconds": time.perf_counter() - t_start, **times, "cpu_seconds": time.process_time() - cpu_start,
        "cpu_threads": torch.get_num_threads(),
        "config": {**asdict(cfg), "compare": list(cfg.compare)},
        "device": str(next(base.parameters()).device), "dtype": str(next(base.parameters()).dtype).replace("torch.", ""),
    }
    if "fixed" in cfg.compare:
        summary["studies"]["fixed"] = _fixed_study(model, encoder, order, val_items, val.answers, cfg, checkpoint)
    model.config.extra.update(fitted={k2: summary[k2] for k2 in ("n_inputs", "n_fit", "n_val", "n_evidence", "evidence",
                                                                 "target_agreement", "val_agreement", "val_mean_layers",
                                                                 "seconds")},
                              how="roe_core.fit: least-squares stand-ins, routers fitted to per-example evidence, "
                                  "threshold calibrated on held-out inputs against the dense answers")
    static.config.extra.update(fitted={"n_fit": len(fit_items), "evidence": cfg.evidence, "k_from_roe_val_layers":
                                       main["mean_layers"]})
    model.save_roe(out / ROE_DIR)
    static.save_static(out / STATIC_DIR)
    if cfg.export_answers:
        export_answers(fit_items, dense.answers, out / "own_answers")
    summary["seconds"] = time.perf_counter() - t_start
    summary["cpu_seconds"] = time.process_time() - cpu_start
    (out / SUMMARY).write_text(json.dumps(summary, indent=1))
    if progress is not None:
        progress("done", 1, 1)
    return summary


def export_answers(items, answers: list[str], folder: Path) -> Path:
    """items [(image, question)] with the dense model's answers as a LLaVA JSON (folder/data.json, images in
    folder/images): data for a short refinement on the model's own answers (python -m roe_core.train ...)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for k, ((im, q), a) in enumerate(zip(items, answers)):
        im.convert("RGB").save(folder / "images" / f"{k}.png")
        records.append({"image": f"{k}.png", "conversations": [{"from": "human", "value": "<image>\n" + q},
                                                                {"from": "gpt", "value": a}]})
    (folder / "data.json").write_text(json.dumps(records))
    return folder / "data.json"


def _open(path):
    from ..runtime.images import load_image
    return load_image(path)


def _route_study(model, encoder, kind, evidence, feats, val_feats, val_items, val_answers, cfg, progress, checkpoint,
                 cache) -> dict:
    """Routers fitted to one kind of evidence and their threshold calibrated on val."""
    n = evidence.shape[0]
    y = routers.log_target(evidence)                               # (n, L)
    fit = routers.fit_routers(feats[:n], y)
    a = 1.0 / float(y.std().clamp(min=1e-6))
    c = float(routers.predict(fit, feats[:n]).median())
    routers.write_routers(model, fit, a, c)
    p_val = torch.sigmoid(a * (routers.predict(fit, val_feats) - c)).flatten().sort().values
    tag = hashlib.sha1(fit["weight"].numpy().tobytes() + fit["bias"].numpy().tobytes()).hexdigest()[:12]
    memo_path = cache / f"calibrate_{kind}_{tag}.json" if cache is not None else None     # these routers' points
    memo = json.loads(memo_path.read_text()) if memo_path is not None and memo_path.is_file() else {}
    done = [0]

    def theta(q: float) -> float:
        if q <= 0:
            return 0.0
        return float(p_val[min(len(p_val) - 1, max(0, int(q * len(p_val)) - 1))])

    def evaluate(q: float) -> dict:
        t = theta(q)
        tag = f"{t:.8f}"
        if tag not in memo:
            memo[tag] = routed_agreement(model, encoder, val_items, val_answers, "auto", t, cfg.batch_size,
                                         cfg.max_new_tokens, checkpoint)
            if memo_path is not None:
                memo_path.write_text(json.dumps(memo))
        done[0] += 1
        if progress is not None:
            progress(f"threshold ({kind})", min(done[0], cfg.calib_steps + 1), cfg.calib_steps + 1)
        return memo[tag]

    if cfg.target_layers > 0:               # mean layers on val nearest the target
        q, points = bisect(evaluate, lambda r: r["mean_layers"] >= cfg.target_layers, cfg.calib_steps, 0.0, 0.95)
        q = min(points, key=lambda p: (abs(p["mean_layers"] - cfg.target_layers), -p["q"]))["q"]
    else:                                   # the most skipping that keeps the agreement
        q, points = bisect(evaluate, lambda r: r["agreement"] >= cfg.target_agreement, cfg.calib_steps, 0.0, 0.95)
    best = evaluate(q)                      # q = 0: threshold 0, every layer runs
    return {"fit": fit, "a": a, "c": c, "threshold": theta(q), "skip_quantile": q, "agreement": best["agreement"],
            "mean_layers": best["mean_layers"], "std_layers": best["std_layers"], "points": points,
            "router_r2_gcv_mean": statistics.mean(r for r in fit["r2"] if not math.isnan(r))}


def _fixed_study(model, encoder, order, val_items, val_answers, cfg, checkpoint) -> dict:
    """The fixed path (the first k layers of `order` skipped for every input, the same stand-ins) with the
    most skipping that keeps the target agreement on val, by bisection over k."""
    L = model.num_layers
    lo, hi, points = 0, L - 1, []
    while lo < hi:
        k = (lo + hi + 1) // 2
        route = [i not in set(order[:k]) for i in range(L)]
        r = routed_agreement(model, encoder, val_items, val_answers, route, None, cfg.batch_size, cfg.max_new_tokens,
                             checkpoint)
        points.append({"k": k, **r})
        if r["agreement"] >= cfg.target_agreement:
            lo = k
        else:
            hi = k - 1
    best = next((p for p in points if p["k"] == lo), {"k": 0, "agreement": 1.0, "mean_layers": float(L), "std_layers": 0.0})
    return {"k": lo, "agreement": best["agreement"], "mean_layers": best["mean_layers"], "std_layers": 0.0,
            "points": points}
