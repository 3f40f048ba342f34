"""The package's layers, read from its source with `ast` (nothing is imported):

    models/   pure torch: imports only other models (no files, configs, stages)
    helpers   io, config, settings, devices, data, sources, token_data, training_log: no stage
    metrics/  maths: models, helpers and other metrics only
    stages    everything else: anything but the command line
    cli       cli.py, __main__.py, metrics/__main__.py: anything

plus: no import circle (function-level imports included), nothing imports Snakemake, and no
module imports another module's private (underscore) names.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "pipeline"
HELPERS = {"pipeline.io", "pipeline.config", "pipeline.settings", "pipeline.devices", "pipeline.data",
           "pipeline.sources", "pipeline.token_data", "pipeline.training_log", "pipeline.errors"}
CLI = {"pipeline.cli", "pipeline.__main__", "pipeline.metrics.__main__"}
FILE_CALLS = {"open", "load", "save", "read_text", "read_bytes", "write_text", "write_bytes"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def layer(mod: str) -> str:
    if mod in CLI:
        return "cli"
    if mod.startswith("pipeline.models"):
        return "models"
    if mod.startswith("pipeline.metrics"):
        return "metrics"
    if mod in HELPERS or mod == "pipeline":
        return "helpers"
    return "stages"


ALLOWED = {
    "models": {"models"},
    "helpers": {"models", "helpers"},
    "metrics": {"models", "helpers", "metrics"},
    "stages": {"models", "helpers", "metrics", "stages"},
    "cli": {"models", "helpers", "metrics", "stages", "cli"},
}


def resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(mod: str, path: Path, known: set[str]) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import in the file, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = resolve(mod, path.name == "__init__.py", node)
            for a in node.names:   # `from . import io` imports the module pipeline.io
                sub = f"{target}.{a.name}"
                out.append((sub, [], node.lineno) if sub in known else (target, [a.name], node.lineno))
    return out


def graph() -> dict[str, dict[str, list]]:
    mods = modules()
    known = set(mods)
    return {m: {t: names for t, names, _ in imports(m, p, known) if t in known and t != m} for m, p in mods.items()}


def test_layers():
    mods, bad = modules(), []
    known = set(mods)
    for mod, path in mods.items():
        for target, _, line in imports(mod, path, known):
            if target.split(".")[0] == "snakemake":
                bad.append(f"{path.name}:{line} imports snakemake")
            if target in known and target != mod and layer(target) not in ALLOWED[layer(mod)]:
                bad.append(f"{mod}:{line} ({layer(mod)}) imports {target} ({layer(target)})")
    assert not bad, "\n".join(bad)


def test_no_private_names_across_modules():
    mods, bad = modules(), []
    for mod, path in mods.items():
        for target, names, line in imports(mod, path, set(mods)):
            if target in mods and target != mod:
                bad += [f"{mod}:{line} takes {target}.{n}" for n in names if n.startswith("_")]
    assert not bad, "\n".join(bad)


def test_no_import_circle():
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(g[m]):
            if state.get(t) == 1:
                pytest.fail("import circle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)


# The public API issue 14 asks for (models.kl_vae.load_kl_vae, models.mar.load_mar) lives in
# models/ and reads one checkpoint file each: only these functions may (file name -> functions).
PUBLIC_LOADERS = {"kl_vae.py": {"load_kl_vae"}, "mar.py": {"_read_checkpoint"}}


def test_models_touch_no_files():
    bad = []
    for mod, path in modules().items():
        if layer(mod) != "models":
            continue
        tree = ast.parse(path.read_text())
        skipped = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
                   and f.name in PUBLIC_LOADERS.get(path.name, set()) for n in ast.walk(f)}
        for node in (n for n in ast.walk(tree) if id(n) not in skipped):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
                owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
                if name == "open" or (owner in ("torch", "np", "numpy", "pickle", "json", "yaml")
                                      and name in FILE_CALLS) or name in FILE_CALLS - {"load", "save", "open"}:
                    bad.append(f"{path.name}:{node.lineno} {owner + '.' if owner else ''}{name}(...)")
    assert not bad, "models/ must not read or write files:\n" + "\n".join(bad)


def test_the_checker_sees_a_violation(tmp_path):
    """The reader resolves relative imports the way Python does (a guard against a blind test)."""
    src = tmp_path / "x.py"
    src.write_text("from ..tokens import load_tokens\nfrom . import fid\nimport snakemake\n")
    found = imports("pipeline.metrics.probe", src, set(modules()))
    assert ("pipeline.tokens", ["load_tokens"], 1) in found
    assert ("snakemake", [], 3) in found
    assert layer("pipeline.tokens") not in ALLOWED[layer("pipeline.metrics.probe")]
