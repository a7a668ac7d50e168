"""The tutorial's layout: the story first in train_gpt2.py, and no two files of the project importing each other."""

import ast
import re

from conftest import REPO_ROOT

PROJECT = {p.stem for p in REPO_ROOT.glob("*.py")}
DEV_TOOLS = {p.stem for p in (REPO_ROOT / "dev").glob("*.py")}


def project_imports(path) -> set[str]:
    """The project modules a file imports, anywhere in it (inside functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & (PROJECT | DEV_TOOLS)


def test_the_plumbing_imports_no_project_file_and_nothing_imports_back():
    graph = {name: project_imports(REPO_ROOT / f"{name}.py") - {name} for name in PROJECT}
    graph |= {name: project_imports(REPO_ROOT / "dev" / f"{name}.py") - {name} for name in DEV_TOOLS}
    assert not any(graph[name] & DEV_TOOLS for name in PROJECT)  # the product never needs its development tools
    assert graph["plumbing"] == set()  # knows nothing of GPT-2, nor of any script
    assert graph["settings"] == {"plumbing"}
    assert graph["train_gpt2"] == {"plumbing", "settings"}
    for name in graph:  # no circle, however long: follow every import from every file
        seen, todo = set(), list(graph[name])
        while todo:
            module = todo.pop()
            assert module != name, f"{name}.py imports itself back through {module}.py"
            if module not in seen:
                seen.add(module)
                todo += graph[module]


def test_train_gpt2_tells_the_story_first():
    """Where a reader meets each part (build-nanogpt: attention at line 12, GPT at 79, the loop at 376), and
    Part I, the lecture's trainer, ending with its loop before line 750."""
    lines = (REPO_ROOT / "train_gpt2.py").read_text().splitlines()
    first = lambda prefix: next(i for i, line in enumerate(lines, 1) if line.startswith(prefix))  # noqa: E731
    assert first("class CausalSelfAttention") <= 150
    assert first("class GPT(") <= 300
    assert first("class TrainLoader") < first("class TrainConfig") < first("def lr_schedule") < first("def train(")
    assert first("        for step in range(") < first("# Part II") <= 750
    assert len(lines) <= 1700
    part_one = lines[: first("# Part II")]
    assert sum(len(line) > 110 for line in part_one) <= 10  # a reader never scrolls sideways


def test_the_model_is_the_lectures_and_the_settings_are_the_storys():
    """The model classes carry no extension: no argument, attribute or comment of a Part II section, and
    GPT.forward is build-nanogpt's ~20 lines; TrainConfig holds the story's settings only."""
    source = (REPO_ROOT / "train_gpt2.py").read_text()
    tree = ast.parse(source)
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    for name in ("CausalSelfAttention", "MLP", "Block", "GPT"):
        for method in (n for n in classes[name].body if isinstance(n, ast.FunctionDef)):
            if method.name == "forward":
                assert [a.arg for a in method.args.args] == (["self", "idx", "targets"] if name == "GPT" else ["self", "x"])
        text = ast.get_source_segment(source, classes[name])
        assert not re.search(r"section 1\d|Part II|kv_cache|lora|chunk|checkpoint_activations", text), name
    forward = next(n for n in classes["GPT"].body if isinstance(n, ast.FunctionDef) and n.name == "forward")
    assert forward.end_lineno - forward.lineno + 1 <= 25
    config = classes["TrainConfig"]
    assert config.end_lineno - config.lineno + 1 <= 45
    fields = [n.target.id for n in config.body if isinstance(n, ast.AnnAssign)]
    assert 25 <= len(fields) <= 35 and not any(f.startswith(("lora", "muon", "hellaswag")) for f in fields)
    assert not {"optimizer", "schedule", "shard", "loss", "tensorboard", "model"} & set(fields)


def test_the_top_level_shows_the_product():
    """The card's scripts and the two helper modules at the top (at most 7 Python files), development tools
    under dev/, and a license."""
    assert PROJECT == {"train_gpt2", "plumbing", "settings", "fineweb", "hellaswag", "sample", "validate"}
    assert {"bench", "bench_fineweb", "recipe_proxy"} <= DEV_TOOLS
