"""MkDocs hooks: the repository's own Markdown pages outside docs/ as pages of the site.

RESULTS.md, benchmarks/README.md and CHANGELOG.md stay where GitHub readers look for them;
here each becomes a generated page, and every relative link (in those pages and in docs/)
is resolved against the file's place in the repository, so one link works on GitHub and on
the site alike.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent
# Repository path -> its page on the site.
OUTSIDE = {"RESULTS.md": "results.md", "benchmarks/README.md": "benchmarks.md",
           "CHANGELOG.md": "changelog.md"}
LINK = re.compile(r"(\]\()([^)\s#]*)(#[^)\s]*)?(\s+\"[^\"]*\")?\)")


def on_files(files, config):
    for source, page in OUTSIDE.items():
        files.append(File.generated(config, page, content=(ROOT / source).read_text()))
    return files


def _site_target(repo_path: str) -> str | None:
    """Where a repository path is on the site, relative to docs/ (None: not on it)."""
    if repo_path in OUTSIDE:
        return OUTSIDE[repo_path]
    if repo_path.startswith("docs/"):
        return repo_path.removeprefix("docs/")
    return None


def on_page_markdown(markdown, page, config, files):
    here = page.file.src_uri
    repo_here = next((s for s, p in OUTSIDE.items() if p == here), f"docs/{here}")

    def resolve(match: re.Match[str]) -> str:
        opening, target, anchor, title = match.groups()
        if not target or "://" in target or target.startswith(("mailto:", "/")):
            return match.group(0)
        repo_target = posixpath.normpath(posixpath.join(posixpath.dirname(repo_here), target))
        site = _site_target(repo_target)
        if site is None:  # left as written: strict mode names it
            return match.group(0)
        relative = posixpath.relpath(site, posixpath.dirname(here) or ".")
        return f"{opening}{relative}{anchor or ''}{title or ''})"

    return LINK.sub(resolve, markdown)
