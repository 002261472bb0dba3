"""The package's own rules about itself, checked on its source: dependencies run one way (no import
cycle, even one hidden in a function, and no subpackage importing one above it), and a module's private
names (`_name`) stay in that module. A walk over the AST of every module of `minimind/`; nothing is imported."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "minimind"


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_uses(path: Path, package: Path = PACKAGE) -> list[str]:
    """`from minimind.x import _name` and `x._name` on a module bound by `import minimind.x as x` or
    `from minimind import x`, where x is another module of the package."""
    this, found, modules = module_name(path, package), [], {}
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "minimind":
            for alias in node.names:
                if (package.parent / (node.module + "." + alias.name).replace(".", "/")).with_suffix(".py").is_file():
                    modules[alias.asname or alias.name] = f"{node.module}.{alias.name}"
                elif is_private(alias.name) and node.module != this:
                    found.append(f"{this}:{node.lineno} imports {node.module}.{alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("minimind.") and alias.asname:
                    modules[alias.asname] = alias.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
            if is_private(node.attr) and modules[node.value.id] != this:
                found.append(f"{this}:{node.lineno} uses {modules[node.value.id]}.{node.attr}")
    return found


# Each part of the package may import only from the parts below it (and itself). Parts on one level
# never import each other.
LEVELS = {
    "storage": 0,
    "model": 1,  # the network, its config, LoRA, the VLM, checkpoints, the tokenizer every model folder holds
    "data": 2,  # JSONL records -> rows and batches, prepared shards, pictures
    "inference": 3,  # sampling, decoding, the continuous batch, chat prompts
    "tracking": 4, "training": 4, "demo": 4,  # MLflow; the loop every worker runs; the demo world
    "rl": 5,  # GRPO: its own loop on top of the training one
    "driver": 6, "serve": 6,  # the driver side of a stage job; Ray Serve
    "cli": 7,
}


def imports_of(path: Path, package: Path = PACKAGE) -> set[str]:
    """The package's modules that `path` imports anywhere (at the top or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == package.name:
            for alias in node.names:
                module = f"{node.module}.{alias.name}"
                is_module = any(
                    (package.parent / module.replace(".", "/")).with_suffix(suffix).exists() for suffix in (".py", "")
                )
                found.add(module if is_module else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == package.name)
    return found - {module_name(path, package)}


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    return {module_name(path, package): imports_of(path, package) for path in sorted(package.rglob("*.py"))}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph.get(node, ()):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def part(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{module} imports {target}"
        for module, targets in sorted(graph.items())
        for target in sorted(targets)
        if part(target) and part(module) != part(target) and LEVELS[part(target)] >= LEVELS[part(module)]
    ]


def test_the_package_has_no_import_cycle_and_every_part_imports_only_parts_below_it():
    graph = import_graph()
    assert len(graph) > 40 and graph["minimind.training.loop"]  # the walk found the package and its imports
    assert {part(module) for module in graph} - {""} == set(LEVELS)  # every part has its level
    assert cycles(graph) == []
    assert upward_imports(graph) == []


def test_the_checks_see_a_cycle_hidden_in_a_function_and_an_upward_import(tmp_path):
    package = tmp_path / "minimind"
    for folder in ("model", "inference"):
        (package / folder).mkdir(parents=True)
    (package / "model" / "model.py").write_text("def generate(self):\n    from minimind.inference.generate import generate\n")
    (package / "inference" / "generate.py").write_text("from minimind.model import model\n")
    graph = import_graph(package)
    assert graph == {
        "minimind.model.model": {"minimind.inference.generate"},
        "minimind.inference.generate": {"minimind.model.model"},
    }
    assert cycles(graph) == [["minimind.inference.generate", "minimind.model.model"]]
    assert upward_imports(graph) == ["minimind.model.model imports minimind.inference.generate"]


STAGE_NAMES = {"pretrain", "sft", "dpo", "reason", "kd", "grpo", "vlm_pretrain", "vlm_sft"}


def stage_name_switches(path: Path, package: Path = PACKAGE) -> list[str]:
    """Comparisons of a stage (`stage`, `stage_name`, `x.stage`, `x.name`) with a stage's name: what the
    table of stages (minimind.driver.stages) should say instead."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        names = {c.value for side in sides for c in ([side] + list(getattr(side, "elts", []))) if isinstance(c, ast.Constant)}
        subjects = [side for side in sides if (isinstance(side, ast.Name) and side.id in ("stage", "stage_name"))
                    or (isinstance(side, ast.Attribute) and side.attr in ("stage", "name"))]
        if names & STAGE_NAMES and subjects:
            found.append(f"{module_name(path, package)}:{node.lineno} {ast.unparse(node)}")
    return found


def test_no_module_switches_on_a_stage_name_the_stage_table_holds_every_fact():
    modules = [path for path in sorted(PACKAGE.rglob("*.py")) if path.parent.name != "demo"]  # the demo world names its files
    assert [switch for path in modules for switch in stage_name_switches(path)] == []


def test_the_check_sees_a_switch_on_a_stage_name(tmp_path):
    (tmp_path / "minimind").mkdir()
    path = tmp_path / "minimind" / "runner.py"
    path.write_text('if stage.name == "kd":\n    pass\nif stage_name in ("dpo", "reason"):\n    pass\n'
                    'if kind == "sft":\n    pass\n')  # a data kind is no stage
    assert stage_name_switches(path, tmp_path / "minimind") == [
        "minimind.runner:1 stage.name == 'kd'", "minimind.runner:3 stage_name in ('dpo', 'reason')"]


def test_no_module_uses_another_modules_private_names():
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 40  # the walk found the package
    assert [use for path in modules for use in private_uses(path)] == []


def test_the_check_sees_both_ways_of_reaching_a_private_name(tmp_path):
    # a module of the package that does both, and one that only uses its own private names
    (tmp_path / "minimind").mkdir()
    (tmp_path / "minimind" / "train.py").write_text("")
    (tmp_path / "minimind" / "grpo.py").write_text(
        "from minimind.data import _pad, collate\nfrom minimind import train\ntrain._say('x')\n_own = 1\n"
    )
    (tmp_path / "minimind" / "data.py").write_text("def _pad(): ...\nprint(_pad)\n")
    found = private_uses(tmp_path / "minimind" / "grpo.py", tmp_path / "minimind")
    assert found == ["minimind.grpo:1 imports minimind.data._pad", "minimind.grpo:3 uses minimind.train._say"]
    assert private_uses(tmp_path / "minimind" / "data.py", tmp_path / "minimind") == []
