"""The package's imports point down the data path only (ops <- models <- sampling <- io <- apps/train <- cli) and
form no cycle; read with the standard library's `ast`, every import (also those inside functions) counts."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "bigr_engine"

# The floor of each top-level part of the package; a module may import only parts on lower floors, and its own
# part (apps and train, both on floor 5, do not import each other).
FLOORS = {
    "errors": 0, "_version": 0,
    "ops": 1,          # compiled ops, their twins, the kernel choice, rng, packing
    "models": 2,       # tokenizer, transformer, transcoder, the BiGR network
    "sampling": 3,     # options, reference loop, engine, CUDA graphs, BiGR with generate
    "io": 4,           # checkpoints, the atomic writer, images, the bundled default
    "": 4.5,           # the package root: the public API (re-exports of the floors below)
    "apps": 5, "train": 5,
    "export": 5,
    "serve": 5.2,      # the HTTP service (it runs the applications' inpainting)       # ONNX export, the host loop over exported graphs (ONNX Runtime), TensorRT engines
    "info": 5.5,       # `python -m bigr_engine.info`: the build report and self-test table (`bigr info` calls it)
    "cli": 6, "__main__": 7,
}


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    found = {module_name(p): p for p in PKG.rglob("*.py")}
    return found


def part(name: str) -> str:
    """bigr_engine.sampling.engine -> sampling; bigr_engine -> '' (the root)."""
    bits = name.split(".")
    return bits[1] if len(bits) > 1 else ""


def imports(path: Path, known: set[str]) -> set[str]:
    """The package modules `path` imports (absolute and relative; `from X import Y` counts Y when it is a module)."""
    tree = ast.parse(path.read_text(), str(path))
    me = module_name(path)
    here = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "bigr_engine")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.rsplit(".", node.level - 1)[0] if node.level > 1 else here
                src = f"{base}.{node.module}" if node.module else base
            else:
                src = node.module or ""
            if src.split(".")[0] != "bigr_engine":
                continue
            subs = [f"{src}.{a.name}" for a in node.names if f"{src}.{a.name}" in known]
            found.update(subs or [src])
            if len(subs) < len(node.names):
                found.add(src)
    return {m for m in found if m in known} - {me}


def graph():
    mods = modules()
    known = set(mods)
    return {m: imports(p, known) if p else set() for m, p in mods.items()}


def test_every_part_has_a_floor():
    assert {part(m) for m in modules()} <= set(FLOORS)


def test_imports_point_down():
    bad = []
    for src, targets in graph().items():
        for dst in targets:
            a, b = part(src), part(dst)
            if a == b:
                continue
            if FLOORS[b] >= FLOORS[a] and not dst.startswith(src + "."):   # a package may import its own modules
                bad.append(f"{src} (floor {FLOORS[a]}) imports {dst} (floor {FLOORS[b]})")
    assert not bad, "imports that point up or sideways:\n" + "\n".join(sorted(bad))


def test_no_cycles():
    g = graph()
    # a package's __init__ importing its own modules is the usual re-export, not a cycle of the data path
    edges = {m: {d for d in ds if not d.startswith(m + ".")} for m, ds in g.items()}
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(edges[m]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_models_know_nothing_of_sampling():
    for src, targets in graph().items():
        if part(src) == "models":
            assert not any(part(t) in ("sampling", "io", "apps", "train", "cli") for t in targets), (src, targets)


def test_the_checker_sees_a_violation(tmp_path):
    """The checker itself: an upward import inside a function is found."""
    f = tmp_path / "bigr_engine" / "ops" / "bad.py"
    f.parent.mkdir(parents=True)
    f.write_text("def f():\n    from bigr_engine.cli.main import main\n    from ..sampling import engine\n")
    known = {"bigr_engine.cli.main", "bigr_engine.sampling.engine", "bigr_engine.ops.bad"}
    global PKG
    saved, PKG = PKG, tmp_path / "bigr_engine"
    try:
        assert imports(f, known) == {"bigr_engine.cli.main", "bigr_engine.sampling.engine"}
    finally:
        PKG = saved
