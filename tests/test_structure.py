"""The shape of the code, held by tests: files stay readable, the library never reaches up into the demo
model or the UI, the app never into a system's internals, training never into the benchmark."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 700


def py_files(*folders):
    return [p for f in folders for p in sorted((ROOT / f).rglob("*.py"))]


def imports(path: Path) -> set[str]:
    """Every module a file imports, absolute (relative imports resolved against its package)."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}
    return out


@pytest.mark.parametrize("path", py_files("roe_core", "app") + [ROOT / "app.py"], ids=lambda p: str(p.relative_to(ROOT)))
def test_no_file_is_over_700_lines(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


def test_the_core_does_not_import_the_demo_model_or_the_ui():
    for path in py_files("roe_core/systems", "roe_core/runtime", "roe_core/analysis", "roe_core/train",
                         "roe_core/scenes", "roe_core/bench") + [ROOT / "roe_core/serving.py"]:
        bad = {m for m in imports(path) if m.startswith(("roe_core.embedded", "app"))}
        assert not bad, (path, bad)


def test_training_never_imports_the_benchmark():
    for path in py_files("roe_core/train", "roe_core/embedded"):
        assert not {m for m in imports(path) if m.startswith("roe_core.bench")}, path


def test_the_app_reads_traces_not_system_internals():
    """app/ may use the registry, the Trace protocol and the pipeline interface, never a system's module."""
    from roe_core.systems import registry
    internals = {spec.pipeline.split(":")[0] for spec in registry.SYSTEMS.values()}
    for path in py_files("app") + [ROOT / "app.py"]:
        bad = {m for m in imports(path) if any(m == i or m.startswith(i + ".") for i in internals)}
        assert not bad, (path, bad)


def test_system_names_appear_only_in_their_registry_entry_and_own_files():
    """Adding a system is its files plus one registry entry: no other library or app file names one (the
    embedded model's recipe excepted: it has a training stage per system it ships, which a new system may
    add). RoE (the method) and the dense reference may be named."""
    from roe_core.systems import registry
    allowed = {"roe_core/systems/registry.py"}
    for spec in registry.SYSTEMS.values():
        for target in (spec.pipeline, spec.config or "", spec.trainer or ""):
            mod = target.split(":")[0]
            if mod:
                allowed.add(mod.replace(".", "/") + ".py")
    quoted = [f'"{n}"' for n in registry.SYSTEMS if n not in ("dense", "roe")]
    found = {}
    for path in py_files("roe_core", "app") + [ROOT / "app.py"]:
        rel = str(path.relative_to(ROOT))
        if rel not in allowed and not rel.startswith("roe_core/embedded/"):
            named = [q for q in quoted if q in path.read_text()]
            if named:
                found[rel] = named
    assert not found
