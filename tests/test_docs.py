"""Every code block of README.md and docs/*.md runs as written.

The blocks of one page run in order in one fresh directory: Python blocks
share one namespace, shell blocks run in bash with this environment's tools
first on PATH, so a page can write a store in one block and read it in the
next, as its reader would. A block is left out only behind an HTML comment
``<!-- not run: why -->`` on the line above it; the set-up commands are
checked against .ci/run instead.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"(<!-- not run: (?P<why>[^>]*?) -->\n)?```(?P<lang>\w*)\n(?P<body>.*?)```", re.S)
RUNS = {"python", "bash"}


def blocks(page: Path) -> list[tuple[str, str, str | None]]:
    """``(language, code, reason not run)`` of each fenced block, in order."""
    return [(m["lang"], m["body"], m["why"]) for m in FENCE.finditer(page.read_text())]


def test_every_page_has_blocks_and_every_block_a_known_language() -> None:
    assert (ROOT / "docs").is_dir()
    for page in PAGES:
        found = blocks(page)
        assert found, f"{page.name} has no code block"
        for lang, _, _ in found:
            assert lang in RUNS | {"text"}, f"{page.name}: a block in {lang!r}, which this test cannot run"


def test_only_the_set_up_commands_are_left_out() -> None:
    skipped = [(page.name, body) for page in PAGES for _, body, why in blocks(page) if why]
    assert [name for name, _ in skipped] == ["README.md", "README.md"]
    demo, tests = (body.strip() for _, body in skipped)
    assert demo.endswith("dask-labelissues demo") and "pip install -e '.[plot]'" in demo
    # The README's test command is the one CI runs.
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install --quiet -e '.[test]'" in ci and "pip install -e '.[test]'" in tests
    assert tests.endswith("python -m pytest -q") and ci.rstrip().endswith("python -m pytest -q")


def test_the_readme_stays_short() -> None:
    words = len(re.sub(r"```.*?```", "", (ROOT / "README.md").read_text(), flags=re.S).split())
    assert words < 1800, f"README.md has {words} words of prose; longer guides belong in docs/"


def test_links_to_files_in_the_repository_resolve() -> None:
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#:]+)\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which is not there"


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_the_code_blocks_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    namespace: dict = {"__name__": "__main__"}
    quickstart = None
    for number, (lang, body, why) in enumerate(blocks(page), 1):
        if why or lang == "text":
            continue
        where = f"{page.name}, block {number}"
        if lang == "python":
            exec(compile(body, where, "exec"), namespace)
            if "load_digits" in body:
                found = namespace["result"]
                quickstart = (found.num_issues, int(np.isin(namespace["flipped"], found.issues).sum()))
            continue
        proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", body], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=300)
        finally:
            # A block may start servers in the background: stop its whole group.
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        assert proc.returncode == 0, f"{where} failed:\n{body}\n{out}"
    if page.name == "README.md":
        # The quickstart's prose quotes what its code found.
        said = tuple(map(int, re.search(r"finds (\d+) issues, (\d+) of them", page.read_text()).groups()))
        assert said == quickstart, f"README.md says {said} (issues, flipped among them); the code found {quickstart}"
