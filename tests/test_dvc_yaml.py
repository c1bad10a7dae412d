"""dvc.yaml stays honest: each stage declares the library code it imports, and the params groups it reads."""

import ast
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def _module_file(name: str) -> Path | None:
    path = SRC.joinpath(*name.split("."))
    if (path / "__init__.py").exists():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").exists() else None


def _imports(path: Path) -> set[str]:
    """gmner modules imported anywhere in ``path`` (function-level imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return {n for n in names if n.split(".")[0] == "gmner" and _module_file(n)}


def _closure(script: Path) -> set[Path]:
    seen, todo = set(), [script]
    while todo:
        for name in _imports(todo.pop()):
            parts = name.split(".")
            for i in range(2, len(parts) + 1):  # importing gmner.a.b runs gmner/a/__init__.py too
                file = _module_file(".".join(parts[:i]))
                if file and file not in seen:
                    seen.add(file)
                    todo.append(file)
    return seen


def _stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_every_stage_declares_the_library_code_it_imports():
    missing = {}
    for name, stage in _stages().items():
        script = ROOT / stage["cmd"].split()[1]
        deps = [d if isinstance(d, str) else next(iter(d)) for d in stage["deps"]]
        declared = [ROOT / d for d in deps]
        assert script in declared, f"stage {name} does not depend on its own script"
        for file in _closure(script):
            if file.name == "__init__.py" and file.parent == SRC / "gmner":
                continue  # the package marker holds only the version
            if not any(file == d or d in file.parents for d in declared):
                missing.setdefault(name, []).append(str(file.relative_to(ROOT)))
    assert not missing, f"dvc.yaml stages miss deps on code they import: {missing}"


def test_declared_code_deps_exist():
    for name, stage in _stages().items():
        for dep in stage["deps"]:
            if dep.startswith(("src/", "stages/")):
                assert (ROOT / dep).exists(), f"stage {name} depends on missing {dep}"


def test_stage_params_are_groups_of_params_yaml():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name, stage in _stages().items():
        for key in stage.get("params", []):
            node = params
            for part in key.split("."):
                assert part in node, f"stage {name} declares param {key}, absent from params.yaml"
                node = node[part]


def _declares(stage: dict, file: Path) -> bool:
    declared = [ROOT / (d if isinstance(d, str) else next(iter(d))) for d in stage["deps"]]
    return any(file == d or d in file.parents for d in declared)


def test_evaluate_stages_declare_the_model_code_the_predictor_imports_lazily():
    from gmner.predictor import LAZY_LOADERS

    stages = _stages()
    producers = {}
    for stage in stages.values():
        for out in stage.get("outs", []):
            producers[out if isinstance(out, str) else next(iter(out))] = stage
    checked = 0
    for name, stage in stages.items():
        words = stage["cmd"].split()
        if "--model" not in words:
            continue
        trainer = producers[f"models/{words[words.index('--model') + 1]}"]
        trained_with = _closure(ROOT / trainer["cmd"].split()[1])
        for module in LAZY_LOADERS.values():
            file = _module_file(module)
            if file in trained_with:  # the model this stage evaluates is loaded through this module
                checked += 1
                missing = [str(f.relative_to(ROOT)) for f in {file, *_closure(file)}
                           if f.name != "__init__.py" and not _declares(stage, f)]
                assert not missing, f"stage {name} loads {module} but does not depend on {missing}"
    assert checked, "no evaluate stage loads a lazily imported model"
