"""The tutorial's layout: the story first in train_gpt2.py, and no two files of the project importing each other."""

import ast

from conftest import REPO_ROOT

PROJECT = {p.stem for p in REPO_ROOT.glob("*.py")}


def project_imports(path) -> set[str]:
    """The project modules a file imports, anywhere in it (inside functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & PROJECT


def test_the_plumbing_imports_no_project_file_and_nothing_imports_back():
    graph = {name: project_imports(REPO_ROOT / f"{name}.py") - {name} for name in PROJECT}
    assert graph["plumbing"] == set()  # knows nothing of GPT-2, nor of any script
    assert graph["settings"] == {"plumbing"}
    assert graph["train_gpt2"] == {"plumbing", "settings"}
    for name in PROJECT:  # no circle, however long: follow every import from every file
        seen, todo = set(), list(graph[name])
        while todo:
            module = todo.pop()
            assert module != name, f"{name}.py imports itself back through {module}.py"
            if module not in seen:
                seen.add(module)
                todo += graph[module]


def test_train_gpt2_tells_the_story_first():
    """Where a reader meets each part (build-nanogpt: attention at line 12, GPT at 79, the loop at 376)."""
    lines = (REPO_ROOT / "train_gpt2.py").read_text().splitlines()
    first = lambda prefix: next(i for i, line in enumerate(lines, 1) if line.startswith(prefix))  # noqa: E731
    assert first("class CausalSelfAttention") <= 150
    assert first("class GPT(") <= 300
    assert first("class TrainLoader") < first("def lr_schedule") < first("def train(") < first("# Part II")
    assert first("        for step in range(") <= 900
    assert len(lines) <= 1550
