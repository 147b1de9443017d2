"""RoE Explorer: chat with an RoE model about an image, watch each answer's route, and ask the same
question of the dense model and MoE-LLaVA side by side.

    python app.py                                  # the embedded model, GPU (bf16) if there is one
    python app.py --model tiny                     # random tiny model (tests, smoke runs)
    python app.py --model llava-hf/llava-1.5-7b-hf --roe runs/roe-llava --device cuda
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
    p.add_argument("--roe", default=None, help="RoE folder (roe_config.json + roe.safetensors) for --model")
    p.add_argument("--moe-llava", default=None, help="MoE-LLaVA folder (moe_config.json + moe.safetensors) for --model")
    p.add_argument("--systems", default=None,
                   help="systems to load, comma-separated, of dense,roe,moe_llava (default: every one the model has "
                        "parts for; RoE is always loaded)")
    p.add_argument("--device", default="auto", help='"auto" (GPU when there is one), "cpu", "cuda", "cuda:1"...')
    p.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=None, help="port (default: 7860 or the next free one)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
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
                                 "model instead: its answers are noise, but every panel works. Start with --model "
                                 "to load another model.")


def _load(args, model: str) -> dict:
    from roe_core.systems import load_base, load_systems, shipped_systems

    chosen = [x.strip() for x in args.systems.split(",") if x.strip()] if args.systems else shipped_systems(model)
    if "roe" not in chosen:
        chosen = ["roe", *chosen]      # the page is built around RoE's views
    loaded = load_base(model, args.device, args.dtype)
    return load_systems(chosen, loaded=loaded, parts={"roe": args.roe, "moe_llava": args.moe_llava})


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
    pipe = pipes["roe"]
    info = pipe.info
    print(f"RoE Explorer: model {info.get('model')} on {info.get('device')} ({info.get('dtype')}), "
          f"{info.get('num_layers')} decoder layers; systems {', '.join(pipes)}", file=sys.stderr)

    from app.ui import build_demo, launch_options

    demo = build_demo(pipe, max_new_tokens=args.max_new_tokens, speed_repeats=args.speed_repeats, notice=notice,
                      systems=pipes)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, **launch_options())
    return 0


if __name__ == "__main__":
    sys.exit(main())
