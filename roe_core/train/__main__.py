"""python -m roe_core.train [--system roe|moe_llava|evomoe] ...: trains a system's parts (default: RoE)."""
import sys

argv = sys.argv[1:]
system = "roe"
if "--system" in argv:
    i = argv.index("--system")
    system = argv[i + 1] if i + 1 < len(argv) else ""
    del argv[i:i + 2]
if system == "roe":
    from .roe import main
elif system == "moe_llava":
    from .moe_llava import main
elif system == "evomoe":
    from .evomoe import main
else:
    sys.exit(f"--system must be roe, moe_llava or evomoe, not {system!r}")
main(argv)
