"""Copy the ``# [START howto_...]`` snippets of the package's code into the how-to pages under ``docs/howto/``.

Usage: ``.venv/bin/python scripts/sync_howto_snippets.py [--check]`` (``--check``: exit 1 when a page is stale).
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "plugins" / "healthimaging").glob("*.py")) + sorted((ROOT / "dags").glob("*.py"))
PAGES = sorted((ROOT / "docs" / "howto").glob("*.md"))
CODE_MARKER = re.compile(r"^[ \t]*# \[START (howto_\w+)\]\n(.*?)^[ \t]*# \[END \1\]", re.M | re.S)
PAGE_MARKER = re.compile(
    r"(<!-- \[START (howto_\w+)\] -->\n```python\n)(.*?)(```\n<!-- \[END \2\] -->)", re.S
)


def snippets() -> dict[str, str]:
    """Every snippet in the sources, dedented, by marker name."""
    found: dict[str, str] = {}
    for source in SOURCES:
        for match in CODE_MARKER.finditer(source.read_text()):
            found[match[1]] = textwrap.dedent(match[2])
    return found


def synced(page: str, code: dict[str, str]) -> str:
    """The page with each included snippet replaced by the code's.

    :param page: the page's text
    :param code: the snippets by marker name
    """

    def replace(match: re.Match[str]) -> str:
        if match[2] not in code:
            raise SystemExit(f"no code snippet {match[2]} for a how-to page")
        return match[1] + code[match[2]] + match[4]

    return PAGE_MARKER.sub(replace, page)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    code = snippets()
    stale = []
    for page in PAGES:
        text = page.read_text()
        new = synced(text, code)
        if new != text:
            stale.append(page.name)
            if not args.check:
                page.write_text(new)
    if stale and args.check:
        print(f"stale how-to pages: {', '.join(stale)}; run scripts/sync_howto_snippets.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
