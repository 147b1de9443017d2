"""RoE Explorer: chat with an RoE model about an image, watch each answer's route, and ask the same
question of the dense model and MoE-LLaVA side by side.

    python app.py                                  # the embedded model, GPU (bf16) if there is one
    python app.py --model tiny                     # random tiny model (tests, smoke runs)
    python app.py --model llava-hf/llava-1.5-7b-hf --roe runs/roe-llava --device cuda
    python app.py --host 0.0.0.0 --auth alice:secret   # other machines may connect: ask them to log in

It listens on 127.0.0.1 (this machine only) unless --host says otherwise; binding to another address
without --auth prints a warning. Questions that arrive together are answered in one batch (--max-batch,
--batch-window-ms); --max-question-tokens, --max-history-turns and --rate-limit refuse what would hold the
model, before any model work (0 turns a limit off). --engine picks how every system decodes (auto: the
CUDA-graph engine on a GPU, the eager loop on a CPU; eager: the engine's own code uncaptured, on any device).
"""
from __future__ import annotations

import os
import sys

# Before gradio is imported: no analytics calls, and no proxy between the app and its own health check.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["NO_PROXY"] = os.environ["no_proxy"] = ",".join(dict.fromkeys(
    [h for h in os.environ.get("NO_PROXY", "").split(",") if h] + ["localhost", "127.0.0.1"]))

import argparse  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="RoE Explorer: a Gradio app over an RoE (Routing Experts) LLaVA model.")
    p.add_argument("--model", default="embedded",
                   help='"embedded" (default: the shipped model), "tiny" (random, for tests), '
                        "or a local LLaVA folder / hub id")
    from roe_core.systems import registry

    for spec in registry.SYSTEMS.values():      # --roe, --moe-llava, --evomoe: each system's parts folder
        if spec.has_parts:
            p.add_argument(f"--{spec.name.replace('_', '-')}", default=None, dest=spec.name,
                           help=f"{spec.label} folder ({spec.parts_config} + its safetensors) for --model")
    p.add_argument("--systems", default=None,
                   help=f"systems to load, comma-separated, of {','.join(registry.names())} (default: every one the "
                        "model has parts for; the routed one, RoE, is always loaded)")
    p.add_argument("--device", default="auto", help='"auto" (GPU when there is one), "cpu", "cuda", "cuda:1"...')
    p.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--engine", default="auto", choices=["auto", "graphs", "eager", "off"],
                   help='how every system decodes: "graphs" (the static-shape decode engine with CUDA graphs, CUDA '
                        'only), "eager" (the same engine uncaptured: serve, load-test and benchmark its path on a '
                        'CPU), "off" (the eager loop), "auto" (default: graphs on CUDA, off on the CPU)')
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=None, help="port (default: 7860 or the next free one)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    p.add_argument("--auth", default=None, metavar="USER:PASSWORD",
                   help="ask for this login (gradio's own login page); or @FILE: one USER:PASSWORD per line")
    p.add_argument("--mcp", action="store_true",
                   help="also serve gradio's MCP server (tools: answer, atlas) at /gradio_api/mcp/ (off by default)")
    p.add_argument("--max-batch", type=int, default=8, help="most questions answered in one batch (default 8)")
    p.add_argument("--batch-window-ms", type=float, default=30.0,
                   help="how long a question waits for others to join its batch (default 30 ms)")
    p.add_argument("--max-question-tokens", type=int, default=256,
                   help="longest question, in tokens, refused before any model work (default 256; 0: no limit)")
    p.add_argument("--max-history-turns", type=int, default=16,
                   help="most earlier turns sent with a question (default 16; 0: no limit)")
    p.add_argument("--rate-limit", type=float, default=30.0,
                   help="questions per minute per user, after a burst of 10 (default 30; 0: no limit, e.g. for "
                        "app.loadtest)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="longest answer, in tokens")
    p.add_argument("--speed-repeats", type=int, default=3,
                   help="interleaved timing repeats per path when comparing against every layer")
    return p.parse_args(argv)


def load_pipelines(args):
    """(pipes by system name, the RoE one among them; notice). One base is loaded and every system wraps
    it. Falls back from the embedded model to the tiny one, saying why; any other model that cannot be
    loaded is an error (ModelLoadError) for main() to report."""
    try:
        return _load(args, args.model), None
    except Exception as e:
        if args.model != "embedded":
            raise
        reason = f"{type(e).__name__}: {e}"
    return _load(args, "tiny"), (f"The embedded model could not be loaded ({reason}). Running the tiny random "
                                 "model instead: its answers are noise, and it ships no RoE parts (fit them in the Fit "
                                 "tab). Start with --model to load another model.")


def routed_system() -> str:
    """The system the page is built around: the registry's routed one (RoE)."""
    from roe_core.systems import registry

    return next(n for n, s in registry.SYSTEMS.items() if s.routed)


def _load(args, model: str) -> dict:
    from roe_core.systems import load_base, load_systems, registry, shipped_systems

    chosen = [x.strip() for x in args.systems.split(",") if x.strip()] if args.systems else shipped_systems(model)
    if routed_system() not in chosen:
        chosen = [routed_system(), *chosen]      # the page is built around its route views
    loaded = load_base(model, args.device, args.dtype)
    return load_systems(chosen, loaded=loaded,
                        parts={n: getattr(args, n) for n, s in registry.SYSTEMS.items() if s.has_parts})


def main(argv=None) -> int:
    args = parse_args(argv)
    from roe_core import ModelLoadError

    try:
        pipes, notice = load_pipelines(args)
    except (ModelLoadError, OSError, ValueError) as e:
        print(f"error: could not load model {args.model!r}: {e}", file=sys.stderr)
        return 2
    if notice:
        print(f"warning: {notice}", file=sys.stderr)
    pipe = pipes[routed_system()]
    try:
        for p in pipes.values():
            p.use_engine(args.engine)
        if args.engine == "graphs" and pipe.device.type != "cuda":
            raise ValueError("--engine graphs needs a CUDA device; use --engine eager on the CPU")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info = pipe.info
    print(f"RoE Explorer: model {info.get('model')} on {info.get('device')} ({info.get('dtype')}), "
          f"{info.get('num_layers')} decoder layers; systems {', '.join(pipes)}; decoding: {info.get('engine')}",
          file=sys.stderr)

    from app.layout import build_demo, launch_options
    from roe_core.serving import Limits, Server

    try:
        auth = parse_auth(args.auth)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not is_loopback(args.host) and auth is None:
        print(f"warning: listening on {args.host}, reachable from other machines, with no login. Anyone who can "
              "reach this port can use the model; add --auth USER:PASSWORD (or --auth @file).", file=sys.stderr)
    server = Server(max_batch=args.max_batch, window_s=args.batch_window_ms / 1000.0,
                    limits=Limits(args.max_question_tokens or None, args.max_history_turns or None,
                                  args.rate_limit or None))
    demo = build_demo(pipe, max_new_tokens=args.max_new_tokens, speed_repeats=args.speed_repeats, notice=notice,
                      systems=pipes, server=server, mcp=args.mcp)
    extra = {"mcp_server": True} if args.mcp else {}
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, auth=auth, **extra,
                **launch_options())
    return 0


def parse_auth(value: str | None) -> list[tuple[str, str]] | None:
    """--auth USER:PASSWORD, or @FILE with one USER:PASSWORD per line -> gradio's auth list."""
    if not value:
        return None
    lines = open(value[1:]).read().splitlines() if value.startswith("@") else [value]
    pairs = []
    for line in (x.strip() for x in lines):
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user or not password:
            raise ValueError("--auth takes USER:PASSWORD (or @FILE with one USER:PASSWORD per line)")
        pairs.append((user, password))
    if not pairs:
        raise ValueError(f"--auth {value}: no USER:PASSWORD found")
    return pairs


def is_loopback(host: str) -> bool:
    import ipaddress

    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


if __name__ == "__main__":
    sys.exit(main())
