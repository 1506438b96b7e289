"""A throw-away git checkout shaped like the suite (scd/, configs/, results/), for code-state tests."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.invalid", "GIT_CONFIG_NOSYSTEM": "1"}


def git(root: Path, *args: str) -> str:
    env = {**os.environ, **GIT_ENV}
    out = subprocess.run(["git", "-c", "commit.gpgsign=false", "-c", "core.autocrlf=false", *args], cwd=root,
                         env=env, capture_output=True, text=True, check=True)
    return out.stdout


def make_repo(root: Path) -> str:
    """A committed checkout at ``root``; returns its HEAD sha."""
    root.mkdir(parents=True, exist_ok=True)
    git(root, "init", "-q")
    (root / "scd").mkdir()
    (root / "scd" / "mod.py").write_text("A = 1\nB = 2\n")
    (root / "configs").mkdir()
    (root / "configs" / "x.yaml").write_text("recipe: sft\n")
    (root / "results").mkdir()
    (root / "results" / "leaderboard.md").write_text("| a |\n")
    (root / ".gitignore").write_text("*.pyc\n")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "init")
    return git(root, "rev-parse", "HEAD").strip()


def make_dirty(root: Path) -> list[str]:
    """Dirty the code (one tracked edit, one untracked module) plus changes that are not code
    (results/, an ignored file, an untracked file outside the code folders); returns the code files."""
    (root / "scd" / "mod.py").write_text("A = 1\nB = 3\n")
    (root / "scd" / "new.py").write_text("NEW = True\n")
    (root / "scd" / "junk.pyc").write_bytes(b"\x00ignored")
    (root / "notes.txt").write_text("not code\n")
    (root / "results" / "leaderboard.md").write_text("| b |\n")
    return ["scd/mod.py", "scd/new.py"]
