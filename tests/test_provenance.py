"""code_commit: the commit of the package's checkout, dirty only when code differs."""

from __future__ import annotations

import subprocess

from kat_research import provenance


def git(repo, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_commit_and_dirty_flag(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    (repo / "results").mkdir(parents=True)
    (repo / "code.py").write_text("x = 1\n")
    (repo / "results" / "table.md").write_text("| a |\n")
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    monkeypatch.setattr(provenance, "PACKAGE_ROOT", repo)
    head = git(repo, "rev-parse", "--short", "HEAD")
    assert provenance.code_commit() == head
    (repo / "results" / "table.md").write_text("| b |\n")  # a sweep rewrote its table
    (repo / "notes.txt").write_text("untracked\n")
    assert provenance.code_commit() == head
    (repo / "code.py").write_text("x = 2\n")
    assert provenance.code_commit() == f"{head}+dirty"


def test_outside_a_checkout_the_commit_is_unknown(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "PACKAGE_ROOT", tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert provenance.code_commit() == "unknown"
