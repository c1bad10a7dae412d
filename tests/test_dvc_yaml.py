"""dvc.yaml stays honest: each stage declares the library code it imports (at subpackage level), the params
groups it reads, and the layout keeps its package order (no import cycles)."""

import ast
import re
from pathlib import Path

import yaml

from helpers import REPO

SRC = REPO / "src"
PACKAGE = SRC / "gmner"


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


def _closure(*starts: Path) -> set[Path]:
    seen, todo = set(), list(starts)
    while todo:
        for name in _imports(todo.pop()):
            parts = name.split(".")
            for i in range(2, len(parts) + 1):  # importing gmner.a.b runs gmner/a/__init__.py too
                file = _module_file(".".join(parts[:i]))
                if file and file not in seen:
                    seen.add(file)
                    todo.append(file)
    return seen


def _expand(value, key: str, item):
    if isinstance(value, str):
        return re.sub(r"\$\{(key|item)\}", lambda m: str(key if m.group(1) == "key" else item), value)
    if isinstance(value, list):
        return [_expand(v, key, item) for v in value]
    if isinstance(value, dict):
        return {_expand(k, key, item): _expand(v, key, item) for k, v in value.items()}
    return value


def _stages() -> dict:
    """dvc.yaml's stages, ``foreach`` groups expanded into ``group@item`` stages as DVC names them."""
    stages = {}
    for name, stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items():
        if "foreach" in stage:
            for item in stage["foreach"]:
                stages[f"{name}@{item}"] = _expand(stage["do"], item, item)
        else:
            stages[name] = stage
    return stages


def _deps(stage: dict) -> list[Path]:
    return [REPO / (d if isinstance(d, str) else next(iter(d))) for d in stage["deps"]]


def _declares(stage: dict, file: Path) -> bool:
    return any(file == d or d in file.parents for d in _deps(stage))


def _is_marker(file: Path) -> bool:
    """A package's __init__.py that runs nothing: only its docstring (and, at the top, the version)."""
    body = ast.parse(file.read_text()).body
    return file.name == "__init__.py" and all(
        isinstance(node, ast.Expr | ast.Assign) and not isinstance(getattr(node, "value", None), ast.Call)
        for node in body
    )


def _stage_code(stage: dict) -> set[Path]:
    """The script, and everything it imports, including the stage module gmner.pipeline runs for it."""
    from gmner.pipeline import STAGES

    script = REPO / stage["cmd"].split()[1]
    name = re.search(r'main\("(\w+)"\)', script.read_text()).group(1)
    module = _module_file(STAGES[name].module)
    return {script, module, *_closure(script, module)}


def test_every_stage_declares_the_library_code_it_imports():
    missing = {}
    for name, stage in _stages().items():
        script = REPO / stage["cmd"].split()[1]
        assert script in _deps(stage), f"stage {name} does not depend on its own script"
        for file in _stage_code(stage):
            if _is_marker(file):
                continue
            if not _declares(stage, file):
                missing.setdefault(name, []).append(str(file.relative_to(REPO)))
    assert not missing, f"dvc.yaml stages miss deps on code they import: {missing}"


def test_code_deps_are_whole_subpackages_and_exist():
    for name, stage in _stages().items():
        for dep in _deps(stage):
            rel = dep.relative_to(REPO)
            if rel.parts[0] in ("src", "stages"):
                assert dep.exists(), f"stage {name} depends on missing {rel}"
            if rel.parts[:2] == ("src", "gmner") and dep.is_file():
                # one file of a subpackage only where a stage needs that module and nothing else of it
                assert dep.parent == PACKAGE or rel.as_posix() == "src/gmner/evaluation/scoring.py", rel


def test_no_trainer_depends_on_the_report_formatters():
    for name, stage in _stages().items():
        reads_reports = _declares(stage, PACKAGE / "evaluation" / "reports.py")
        assert reads_reports == name.startswith("evaluate@"), name


def test_stage_params_are_groups_of_params_yaml():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for name, stage in _stages().items():
        for key in stage.get("params", []):
            node = params
            for part in key.split("."):
                assert part in node, f"stage {name} declares param {key}, absent from params.yaml"
                node = node[part]


def test_every_model_folder_is_an_artifact_and_every_trained_model_is_evaluated():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    stages = _stages()
    models = {out for stage in stages.values() for out in stage.get("outs", []) if str(out).startswith("models/")}
    assert models == {artifact["path"] for artifact in dvc["artifacts"].values()}
    evaluated = {f"models/{name.split('@')[1]}" for name in stages if name.startswith("evaluate@")}
    assert evaluated == models - {"models/pretrain"}
    assert all(stage.get("desc") for stage in stages.values())


def test_evaluate_stages_declare_the_model_code_the_predictor_imports_lazily():
    from gmner.models.predictor import LAZY_LOADERS

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
        trained_with = _stage_code(producers[f"models/{words[words.index('--model') + 1]}"])
        for module in LAZY_LOADERS.values():
            file = _module_file(module)
            if file in trained_with:  # the model this stage evaluates is loaded through this module
                checked += 1
                missing = [str(f.relative_to(REPO)) for f in {file, *_closure(file)}
                           if f.name != "__init__.py" and not _declares(stage, f)]
                assert not missing, f"stage {name} loads {module} but does not depend on {missing}"
    assert checked, "no evaluate stage loads a lazily imported model"


def _package(file: Path) -> str:
    """The subpackage a module belongs to, or "gmner" for the top-level modules."""
    rel = file.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else "gmner"


def test_subpackages_import_each_other_without_cycles():
    edges: dict[str, set[str]] = {}
    for file in PACKAGE.rglob("*.py"):
        for name in _imports(file):
            target = _package(_module_file(name))
            if target != _package(file):
                edges.setdefault(_package(file), set()).add(target)
    assert "gmner" not in set().union(*edges.values()), "a subpackage imports a top-level module (cli, predict, ...)"

    def visit(node: str, path: tuple[str, ...]) -> None:
        for nxt in edges.get(node, ()):
            assert nxt not in path, f"import cycle between subpackages: {' -> '.join((*path, nxt))}"
            visit(nxt, (*path, nxt))

    for start in edges:
        visit(start, (start,))


def test_modules_import_each_other_without_cycles():
    files = list(PACKAGE.rglob("*.py"))
    graph = {f: {_module_file(n) for n in _imports(f)} - {f} for f in files}
    done: set[Path] = set()

    def visit(node: Path, path: list[Path]) -> None:
        if node in done:
            return
        for nxt in graph.get(node, ()):
            assert nxt not in path, "import cycle: " + " -> ".join(str(p.relative_to(SRC)) for p in (*path, nxt))
            visit(nxt, [*path, nxt])
        done.add(node)

    for file in files:
        visit(file, [file])
