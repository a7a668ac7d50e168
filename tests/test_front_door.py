"""What a newcomer meets: a README that fits a few screens and shows a picture from the repo, links that
lead somewhere, a license, and nothing that only works beside this project's development machines."""

import gzip
import re

import pytest
from conftest import REPO_ROOT

import fineweb
import recipe_proxy
from plumbing import UserError

README = REPO_ROOT / "README.md"
PAGES = [README, *sorted((REPO_ROOT / "docs").glob("*.md")), REPO_ROOT / "reference_run" / "README.md"]


def test_the_readme_is_a_front_door():
    text = README.read_text()
    assert len(text.splitlines()) <= 260  # the development record lives in docs/
    first_screen = "\n".join(text.splitlines()[:40])
    assert "source .venv/bin/activate" in first_screen and "python train_gpt2.py --preset shakespeare" in first_screen
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert pictures and all((REPO_ROOT / picture).is_file() for picture in pictures)
    assert "python -m pytest -q -n 2 tests" in text  # the command .ci/run runs
    assert (REPO_ROOT / "LICENSE").read_text().startswith("MIT License")


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO_ROOT)))
def test_every_link_leads_to_a_file_of_the_repo(page):
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
        if not re.match(r"[a-z]+://", target):
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which is not in the repo"


def test_nothing_a_user_runs_or_reads_names_the_development_machines_data():
    """../shared holds the data of this project's CI and developers, not of a user's clone."""
    files = [*PAGES, *REPO_ROOT.glob("*.py"), *(REPO_ROOT / "dev").glob("*.py"), *REPO_ROOT.glob("*.ipynb"),
             *(REPO_ROOT / ".ci").glob("*.py"), REPO_ROOT / ".ci" / "gpu_checks.sh"]
    for path in files:
        assert "../shared" not in path.read_text() and "parents[2] / \"shared\"" not in path.read_text(), path


def test_the_recipe_proxy_data_ships_and_reads_like_a_jsonl(tmp_path):
    """recipe_proxy's default: 300 FineWeb documents, gzip'd, read by fineweb.py as the .jsonl they are."""
    assert recipe_proxy.DEFAULT_DATA.is_relative_to(REPO_ROOT) and recipe_proxy.DEFAULT_DATA.is_file()
    plain = tmp_path / "docs.jsonl"
    plain.write_bytes(gzip.decompress(recipe_proxy.DEFAULT_DATA.read_bytes()))
    docs = list(fineweb.read_docs([recipe_proxy.DEFAULT_DATA]))
    assert len(docs) == 300 and docs == list(fineweb.read_docs([plain]))


def test_a_damaged_gzip_input_is_one_line(tmp_path):
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(b'{"text": "a document"}\n' * 1000)[:40])
    not_gzip = tmp_path / "plain.jsonl.gz"
    not_gzip.write_text('{"text": "not compressed"}\n')
    for path in (cut, not_gzip):
        with pytest.raises(UserError, match="is not a readable gzip file"):
            list(fineweb.read_docs([path]))
