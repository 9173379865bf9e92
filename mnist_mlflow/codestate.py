"""Which code a run ran: the git commit of this package's checkout and, when tracked files
have uncommitted changes, the patch (`git diff --binary HEAD`); without git, the installed
package's version. And the recorded code rebuilt: a temporary git worktree at the commit
with the patch applied. Imports neither torch nor MLflow.
"""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from mnist_mlflow.config import UserError

PACKAGE = "mnist-mlflow"
PACKAGE_DIR = Path(__file__).resolve().parent
GIT_TIMEOUT_S = 30


def _git(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                          timeout=GIT_TIMEOUT_S, check=check)


def package_version() -> str:
    try:
        return version(PACKAGE)
    except PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class CodeState:
    """The code of this process: from a git checkout (`commit`, and `patch` when tracked
    files differ from it) or from an installed package (`version` alone)."""

    source: str  # "git" or "package"
    version: str
    commit: str = ""
    patch: str = ""
    root: Path | None = None

    @property
    def dirty(self) -> bool:
        return bool(self.patch)

    def describe(self) -> str:
        """`commit 1a2b3c4 with uncommitted changes`, or `package mnist-mlflow 0.1.0`."""
        if self.source != "git":
            return f"package {PACKAGE} {self.version} (no git checkout)"
        return f"commit {self.commit[:7]}" + (" with uncommitted changes" if self.dirty else "")


def current(package_dir: Path = PACKAGE_DIR) -> CodeState:
    """The code this process runs: the git checkout the package is tracked in, if any."""
    try:
        top = _git(package_dir, "rev-parse", "--show-toplevel").stdout.strip()
        root = Path(top)
        # The package must be tracked there: a virtual environment inside some other
        # repository is no checkout of this code.
        _git(root, "ls-files", "--error-unmatch", str(package_dir / "__init__.py"))
        commit = _git(root, "rev-parse", "HEAD").stdout.strip()
        patch = _git(root, "diff", "--binary", "HEAD", "--").stdout
    except (OSError, subprocess.SubprocessError):  # no git, no repository, not tracked
        return CodeState("package", package_version())
    return CodeState("git", package_version(), commit, patch, root)


def has_commit(root: Path, commit: str) -> bool:
    try:
        _git(root, "cat-file", "-e", f"{commit}^{{commit}}")
    except (OSError, subprocess.SubprocessError):
        return False
    return True


@contextlib.contextmanager
def worktree(root: Path, commit: str, patch: str) -> Iterator[Path]:
    """A temporary git worktree of `root` at `commit` with `patch` applied; removed after."""
    if not has_commit(root, commit):
        raise UserError(f"commit {commit} is not in the repository at {root}: fetch it, or "
                        "reproduce without --at-commit")
    with tempfile.TemporaryDirectory(prefix="mnist-mlflow-code-") as tmp:
        tree = Path(tmp) / "code"
        _git(root, "worktree", "add", "--detach", str(tree), commit)
        try:
            if patch:
                applied = subprocess.run(["git", "-C", str(tree), "apply", "--binary", "-"],
                                         input=patch, capture_output=True, text=True,
                                         timeout=GIT_TIMEOUT_S)
                if applied.returncode:
                    raise UserError(f"the recorded patch does not apply to commit {commit}: "
                                    f"{applied.stderr.strip().splitlines()[0]}")
            yield tree
        finally:
            _git(root, "worktree", "remove", "--force", str(tree), check=False)
