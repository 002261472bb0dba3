"""The package's own rules about itself, checked on its source: a module's private names (`_name`) stay
in that module. A walk over the AST of every module of `minimind/`; nothing is imported."""

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


def test_no_module_uses_another_modules_private_names():
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 30  # the walk found the package
    assert [use for path in modules for use in private_uses(path)] == []


def test_the_check_sees_both_ways_of_reaching_a_private_name(tmp_path):
    # a module of the package that does both, and one that only uses its own private names
    (tmp_path / "minimind").mkdir()
    (tmp_path / "minimind" / "train.py").write_text("")
    (tmp_path / "minimind" / "grpo.py").write_text(
        "from minimind.data import _pad, collate\nfrom minimind import train\ntrain._say('x')\n_own = 1\n")
    (tmp_path / "minimind" / "data.py").write_text("def _pad(): ...\nprint(_pad)\n")
    found = private_uses(tmp_path / "minimind" / "grpo.py", tmp_path / "minimind")
    assert found == ["minimind.grpo:1 imports minimind.data._pad", "minimind.grpo:3 uses minimind.train._say"]
    assert private_uses(tmp_path / "minimind" / "data.py", tmp_path / "minimind") == []
