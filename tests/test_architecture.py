"""The package's imports run one way: each module imports only from the layers below its own, so there are no
cycles; the front ends never import training, data or each other; the command line imports lazily."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tinylm"

# Bottom to top; a module may import from strictly lower layers only.
LAYERS = [
    {"config", "prompts", "tokenizer", "tracking", "kernels", "threads", "data.cache", "data.synthetic"},
    {"runtime", "plot", "model", "data.sources"},
    {"distributed", "loss", "generate", "interchange", "state", "data.instructions"},
    {"checkpoint", "conversation", "data.tokens", "data.mixture"},
    {"chat", "server", "webui", "run_folder", "data.packing", "data.text"},
    {"data.prepare"},
    {"evaluate"},
    {"train"},
    {"cli"},
    {"__main__"},
]
FRONT_ENDS = {"chat", "server", "webui"}
TRAINING_SIDE = {"train", "state", "run_folder", "evaluate", "loss", "distributed"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, *, top_level_only: bool = False) -> set[str]:
    """The tinylm modules `path` imports (all of them, or only those imported at module level)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else ast.walk(tree)
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tinylm":
            if node.module == "tinylm":
                found |= {alias.name for alias in node.names}
            else:
                found.add(node.module.removeprefix("tinylm."))
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("tinylm.") for a in node.names if a.name.startswith("tinylm.")}
    return found


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py") if module_name(p) not in ("", "data")}


def test_every_module_has_a_layer():
    layered = set().union(*LAYERS)
    assert set(all_modules()) == layered


def test_imports_only_go_down():
    layer = {name: index for index, names in enumerate(LAYERS) for name in names}
    upward = [
        f"{name} (layer {layer[name]}) imports {dep} (layer {layer[dep]})"
        for name, path in all_modules().items()
        for dep in imports(path)
        if dep in layer and layer[dep] >= layer[name]
    ]
    assert upward == []


def test_front_ends_import_neither_training_nor_data_nor_each_other():
    for name in FRONT_ENDS:
        deps = imports(all_modules()[name])
        assert not deps & (TRAINING_SIDE | FRONT_ENDS), name
        assert not {d for d in deps if d.startswith("data")}, name


def test_the_command_line_imports_the_package_lazily():
    assert imports(PACKAGE / "cli.py", top_level_only=True) == set()
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, tinylm.cli; print(sorted(m for m in sys.modules if 'torch' in m))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert loaded.stdout.strip() == "[]"
