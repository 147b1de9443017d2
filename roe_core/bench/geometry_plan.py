"""The geometry bench's memory plan (what a batch's variants need on the device, before they are built)
and the issue's targets read from its summary. Used by roe_core.bench.geometry."""
from __future__ import annotations

from transformers import LlavaConfig

from ..runtime.engine import bucket
from ..systems import registry

TARGETS = {   # issue 36: (what, ratio key in a flavour's summary, batch, bound, "min" / "max")
    "roe_fixed_vs_hf_static": ("RoE 10 of 32 skipped vs transformers static-cache generate", 1, 1.35, "min"),
    "every_layer_floor_fraction": ("every-layer engine, share of the bandwidth floor", 1, 0.60, "min"),
    "moe_llava_over_every_layer": ("MoE-LLaVA over the every-layer engine", 1, 1.5, "max"),
    "evomoe_over_every_layer": ("EvoMoE over the every-layer engine", 1, 1.25, "max"),
    "mixed_vs_every_layer": ("mixed routes vs every layer (speedup)", 128, 1.15, "min"),
}


def targets(s: dict) -> dict:
    """Each target of the issue: the measured value (the better of engine and fused engine, and which),
    the bound and whether it is met (None: not measured in this run)."""
    res = {}
    for key, (what, B, bound, kind) in TARGETS.items():
        got = []
        for label in ("engine", "fused"):
            d = s.get(f"bs{B}", {})
            d = d if label == "engine" else d.get("fused", {})
            if d.get(key) is not None:
                got.append((d[key], label))
        best = (max if kind == "min" else min)(got) if got else None
        res[key] = {"what": what, "batch": B, "bound": bound, "kind": kind,
                    "measured": None if best is None else best[0], "by": None if best is None else best[1],
                    "met": None if best is None else (best[0] >= bound if kind == "min" else best[0] <= bound)}
    return res


# --- memory: what a batch's variants need on the device, planned before they are built -----------------

def memory_plan(cfg: LlavaConfig, B: int, prompt: int, new_tokens: int, key_multiple: int, weights_bytes: float,
                extra_bytes: dict[str, float], groups: dict[str, str], dtype_bytes: int) -> dict:
    """Estimated bytes per memory group of a batch: every engine's arena holds each layer's keys/values for
    its rows (B's bucket) x its key capacity, the eager loop and transformers' generate a cache of the
    same size while they run; prefill's transient is a layer's activations over the prompt (three of the
    MLP's width, ten of the model's) and the additive mask (SDPA's fused kernels keep no scores).
    weights_bytes: the base; extra_bytes: per system its own parts (MoE experts). groups: Variant.group ->
    system."""
    t = cfg.text_config
    L, d, heads = t.num_hidden_layers, t.hidden_size, t.num_attention_heads
    kv = t.num_key_value_heads or heads
    hd = getattr(t, "head_dim", None) or d // heads
    K = (prompt + new_tokens + key_multiple - 1) // key_multiple * key_multiple
    kv_bytes = 2 * L * bucket(B, 1 << 30) * kv * K * hd * dtype_bytes
    loop_bytes = 2 * L * B * kv * (prompt + new_tokens) * hd * dtype_bytes
    transient = B * prompt * (3 * t.intermediate_size + 10 * d) * dtype_bytes + B * prompt ** 2 * dtype_bytes
    per_group = {}
    for g, system in groups.items():
        engine = g.split("/", 1)[1]
        per_group[g] = {"system": system, "persistent": kv_bytes if engine not in ("off", "hf") else 0.0,
                        "while_running": loop_bytes if engine in ("off", "hf") else 0.0}
    systems = set(groups.values())
    models = weights_bytes + sum(extra_bytes.get(s, 0.0) for s in systems)
    return {"batch": B, "key_capacity": K, "arena_GB": kv_bytes / 1e9, "loop_cache_GB": loop_bytes / 1e9,
            "prefill_transient_GB": transient / 1e9, "models_GB": models / 1e9, "groups": per_group,
            "all_at_once_GB": (models + sum(v["persistent"] for v in per_group.values())
                               + max([v["while_running"] for v in per_group.values()] + [0.0]) + transient) / 1e9,
            "_models": models, "_transient": transient}


def group_fit(plan: dict, budget_bytes: float | None) -> tuple[list[list[str]] | None, list[str]]:
    """(packs of groups to measure one after another, or None: all at once; groups left out: alone they do
    not fit). Packs are filled greedily in order (a system's flavours stay together where they fit), so
    rounds interleave over as many variants as the device holds."""
    if budget_bytes is None or plan["all_at_once_GB"] * 1e9 <= budget_bytes:
        return None, []
    base = plan["_models"] + plan["_transient"]

    def need(names):
        gs = [plan["groups"][g] for g in names]
        return base + sum(v["persistent"] for v in gs) + max([v["while_running"] for v in gs] + [0.0])
    packs, dropped = [], []
    for g in plan["groups"]:
        if need([g]) > budget_bytes:
            dropped.append(g)
        elif packs and need(packs[-1] + [g]) <= budget_bytes:
            packs[-1].append(g)
        else:
            packs.append([g])
    return packs, dropped


def print_plan(plan: dict, budget_bytes: float | None, groups, dropped) -> None:
    b = "no device limit" if budget_bytes is None else f"budget {budget_bytes / 1e9:.1f} GB"
    print(f"memory plan, batch {plan['batch']} ({b}): models {plan['models_GB']:.1f} GB, arena per engine "
          f"{plan['arena_GB']:.1f} GB (key capacity {plan['key_capacity']}), eager loop's cache "
          f"{plan['loop_cache_GB']:.1f} GB, prefill transient <= {plan['prefill_transient_GB']:.1f} GB; "
          f"all at once {plan['all_at_once_GB']:.1f} GB", flush=True)
    if groups is not None:
        print(f"  does not fit at once: measured in {len(groups)} groups one after another "
              f"(rounds interleave within a group): {', '.join('+'.join(g) for g in groups)}", flush=True)
    for g in dropped:
        print(f"  left out at batch {plan['batch']}: {g} alone does not fit", flush=True)


def public_plan(plan: dict, groups, dropped) -> dict:
    out = {k: v for k, v in plan.items() if not k.startswith("_") and k != "groups"}
    out["measured_in_groups"] = groups
    out["left_out"] = dropped
    return out


def moe_extra_bytes(system: str, L: int, ffn_b: float) -> float:
    """A MoE system's own weights over the base: full expert copies in its MoE layers (default config)."""
    cfg_cls = registry.get(system).config_class()
    if cfg_cls is None:
        return 0.0
    cfg = cfg_cls(num_layers=L)
    n = len(getattr(cfg, "moe_layers", ()) or ())
    return n * getattr(cfg, "num_experts", 0) * ffn_b if not getattr(cfg, "expert_delta_rank", 0) else 0.0


def print_targets(s: dict) -> None:
    print("targets (issue 36):", flush=True)
    for key, t in s.get("targets", {}).items():
        got = "not measured" if t["measured"] is None else f"{t['measured']:.3f} ({t['by']})"
        verdict = {None: "-", True: "MET", False: "missed"}[t["met"]]
        print(f"  {t['what']} at batch {t['batch']}: {got}, {'>=' if t['kind'] == 'min' else '<='} {t['bound']}: "
              f"{verdict}", flush=True)
    for label, c in s.get("crossover", {}).items():
        print(f"  crossover ({label}): mixed/every by batch {c['mixed_vs_every_layer_by_batch']}, mixed beats every "
              f"layer from batch {c['first_batch_mixed_beats_every_layer']}", flush=True)
