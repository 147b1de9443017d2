"""RoE Explorer: chat with an RoE model about an image and watch each answer's route.

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
    p.add_argument("--device", default="auto", help='"auto" (GPU when there is one), "cpu", "cuda", "cuda:1"...')
    p.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=None, help="port (default: 7860 or the next free one)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="longest answer, in tokens")
    p.add_argument("--speed-repeats", type=int, default=3,
                   help="interleaved timing repeats per path when comparing against every layer")
    return p.parse_args(argv)


def load_pipeline(args):
    """(pipe, notice). Falls back from the embedded model to the tiny one, saying why; any other model that
    cannot be loaded is an error (ModelLoadError) for main() to report."""
    from roe_core import RoEPipeline

    try:
        return RoEPipeline.load(args.model, roe=args.roe, device=args.device, dtype=args.dtype), None
    except Exception as e:
        if args.model != "embedded":
            raise
        reason = f"{type(e).__name__}: {e}"
    pipe = RoEPipeline.load("tiny", device=args.device, dtype=args.dtype)
    return pipe, (f"The embedded model could not be loaded ({reason}). Running the tiny random model instead: "
                  "its answers are noise, but every panel works. Start with --model to load another model.")


def main(argv=None) -> int:
    args = parse_args(argv)
    from roe_core import ModelLoadError

    try:
        pipe, notice = load_pipeline(args)
    except (ModelLoadError, OSError, ValueError) as e:
        print(f"error: could not load model {args.model!r}: {e}", file=sys.stderr)
        return 2
    if notice:
        print(f"warning: {notice}", file=sys.stderr)
    info = pipe.info
    print(f"RoE Explorer: model {info.get('model')} on {info.get('device')} ({info.get('dtype')}), "
          f"{info.get('num_layers')} decoder layers", file=sys.stderr)

    from app.ui import build_demo, launch_options

    demo = build_demo(pipe, max_new_tokens=args.max_new_tokens, speed_repeats=args.speed_repeats, notice=notice)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, **launch_options())
    return 0


if __name__ == "__main__":
    sys.exit(main())
