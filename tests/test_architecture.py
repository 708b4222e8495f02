"""The floors of docs/ARCHITECTURE.md, read from the import statements of every module of hf_mae (function bodies
included): a floor imports the floors below it, never the ones above; the tools' command lines are imported by the
`hf-mae` dispatcher only; callbacks do not import the pipeline; first-party imports stand at the top of modules;
the library's text names no path of the repository's own tests or benchmarks (it ships in the wheel without them)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hf_mae"
MODELS = ("configuration_", "modeling_", "losses", "image_processing_")
# what each room may import besides itself and the models (named_configs imports nothing and may be imported by all)
ALLOWED = {
    "models": set(),
    "convert": set(),
    "data": set(),
    "metrics": set(),
    "visualize": set(),
    "training": {"convert", "data", "metrics", "visualize"},
    "study": {"convert", "data", "metrics", "visualize", "training", "cli"},
    "cli": {"convert", "data", "metrics", "visualize", "training", "study"},
    "root": {"convert", "data", "metrics", "visualize", "training", "study", "cli"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _room(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "root"
    top = parts[1]
    if top.startswith(MODELS):
        return "models"
    if top in ("cli", "__main__"):
        return "cli"
    return top


def _is_module(name: str) -> bool:
    path = PACKAGE.parent / name.replace(".", "/")
    return path.is_dir() or path.with_suffix(".py").exists()


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported first-party module, line, inside a function) for every import statement of `path`."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    in_function = {
        id(node)
        for fn in ast.walk(tree)
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
        for node in ast.walk(fn)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from . import convert`: the names may be modules themselves
            names = [f"{base}.{alias.name}" for alias in node.names if _is_module(f"{base}.{alias.name}")] or [base]
        else:
            continue
        found += [(name, node.lineno, id(node) in in_function) for name in names if name.split(".")[0] == "hf_mae"]
    return found


def _violations() -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        room = _room(module)
        for target, line, lazy in _imports(path):
            where = f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}"
            target_room = _room(target)
            if target_room not in (room, "models", "named_configs") and target_room not in ALLOWED[room]:
                problems.append(f"{where}: {room} may not import {target_room}")
            if target.endswith(".__main__") and room != "cli":
                problems.append(f"{where}: a tool's command line is imported by the hf-mae dispatcher only")
            if module == "hf_mae.training.knn" and target == "hf_mae.training.pipeline":
                problems.append(f"{where}: a callback receives its data, it does not import the pipeline")
            if lazy and room != "cli":
                problems.append(f"{where} inside a function: first-party imports stand at the top of the module")
    return problems


def test_every_module_imports_only_the_floors_below_it():
    assert _violations() == []


def test_a_constant_is_defined_once():
    # a module-level tuple of names (choices, suffixes, field lists) stated in two modules is one concept in two homes
    places: dict[tuple, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Tuple) and len(node.value.elts) > 1:
                try:
                    value = ast.literal_eval(node.value)
                except ValueError:
                    continue
                places.setdefault(value, []).append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert {value: where for value, where in places.items() if len(where) > 1} == {}


def test_the_library_names_no_test_or_benchmark_file():
    named = [
        f"{path.relative_to(PACKAGE.parent)}:{number}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if "tests/" in line or "benchmarks/" in line
    ]
    assert named == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    # the reader resolves relative imports, function-level ones included, to the room they reach
    (tmp_path / "hf_mae" / "training").mkdir(parents=True)
    (tmp_path / "hf_mae" / "__init__.py").write_text("")
    (tmp_path / "hf_mae" / "training" / "__init__.py").write_text("")
    (tmp_path / "hf_mae" / "modeling_x.py").write_text("from .training import trainer\n")
    (tmp_path / "hf_mae" / "training" / "knn.py").write_text("def f():\n    from .pipeline import knn_datasets\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", tmp_path / "hf_mae")
    problems = _violations()
    assert any("modeling_x.py:1 imports hf_mae.training: models may not import training" in p for p in problems)
    assert any("knn.py:2 imports hf_mae.training.pipeline: a callback" in p for p in problems)
    assert any("knn.py:2 imports hf_mae.training.pipeline inside a function" in p for p in problems)
