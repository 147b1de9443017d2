"""python -m roe_core.train [--system NAME] ...: trains a system's parts (default: roe). NAME is any
system of roe_core.systems.registry with a trainer; the rest of the arguments go to its main(argv)."""
import sys

from ..systems import registry


def trainable() -> list[str]:
    return [name for name, spec in registry.SYSTEMS.items() if spec.trainer]


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    system = "roe"
    for i, a in enumerate(argv):
        if a == "--system" or a.startswith("--system="):
            system = a.partition("=")[2] if "=" in a else (argv[i + 1] if i + 1 < len(argv) else "")
            del argv[i:i + (1 if "=" in a else 2)]
            break
    spec = registry.SYSTEMS.get(system)
    if spec is None or not spec.trainer:
        sys.exit(f"--system must be a system with a trainer ({', '.join(trainable())}), not {system!r}")
    spec.trainer_main()(argv)


if __name__ == "__main__":
    main()
