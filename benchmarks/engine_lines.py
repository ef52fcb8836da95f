"""Lines of the engine modules, as code, prose and blank lines.

    python benchmarks/engine_lines.py [REV ...]

Without revisions, counts the working tree's ``dask_labelissues/engines``;
with them, each git revision's (read with ``git show``, nothing checked
out).  A line is prose if it lies in a docstring (a string statement, as
``ast`` finds them) or holds only a comment; blank if it holds only
whitespace; code otherwise.
"""

from __future__ import annotations

import ast
import io
import subprocess
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINES = "dask_labelissues/engines"


def count(source: str) -> tuple[int, int, int, int]:
    """``(total, code, prose, blank)`` lines of one module's source."""
    lines = source.splitlines()
    prose = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            prose.update(range(node.lineno, node.end_lineno + 1))
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and lines[tok.start[0] - 1].lstrip().startswith("#"):
            prose.add(tok.start[0])
    blank = {i for i, line in enumerate(lines, 1) if not line.strip()}
    prose -= blank
    return len(lines), len(lines) - len(prose) - len(blank), len(prose), len(blank)


def modules(rev: str | None) -> dict[str, str]:
    """The engine modules' sources, by file name, in ``rev`` or the working tree."""
    if rev is None:
        return {p.name: p.read_text() for p in sorted((ROOT / ENGINES).glob("*.py"))}
    names = subprocess.run(
        ["git", "ls-tree", "--name-only", rev, f"{ENGINES}/"], cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout.split()
    return {
        Path(n).name: subprocess.run(["git", "show", f"{rev}:{n}"], cwd=ROOT, check=True, capture_output=True,
                                     text=True).stdout
        for n in names if n.endswith(".py")
    }


def main(argv: list[str]) -> int:
    print(f"{'tree':<14} {'total':>6} {'code':>6} {'prose':>6} {'blank':>6}")
    for rev in argv or [None]:
        sums = [sum(col) for col in zip(*(count(src) for src in modules(rev).values()))]
        print(f"{rev or 'working tree':<14} " + " ".join(f"{n:>6,}" for n in sums))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
