"""Cross-references in the package's docstrings and comments name things
that exist: a function moved to another module leaves no reference to
where it was."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from types import ModuleType

import pytest

import dask_labelissues

#: ``:role:`target``` as Sphinx writes them.
REFERENCE = re.compile(r":(?:func|class|meth|data|mod|attr|exc|obj):`([^`]+)`")


def _modules() -> dict[str, ModuleType]:
    names = ["dask_labelissues"] + [
        m.name for m in pkgutil.walk_packages(dask_labelissues.__path__, "dask_labelissues.")
        if not m.name.endswith("__main__")  # importing it runs the command
    ]
    return {name: importlib.import_module(name) for name in names}


MODULES = _modules()


def _has(obj: object, name: str) -> bool:
    # Dataclass fields without defaults are annotations, not attributes.
    return hasattr(obj, name) or name in getattr(obj, "__annotations__", {})


def _exists(path: str) -> bool:
    """Whether the dotted ``path`` is a module or an object in one."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for j, part in enumerate(parts[i:]):
            if not _has(obj, part):
                return False
            if j < len(parts[i:]) - 1:
                obj = getattr(obj, part)
        return True
    return False


def _resolves(target: str, module: ModuleType) -> bool:
    """Whether ``target`` names something, read as Sphinx would from
    ``module``: a full path; a path with a leading dot, searched as a
    suffix of every module's names; or a bare name in the module, or on a
    class of it (a method named in its class's docstring)."""
    if "<" in target:  # "text <target>"
        target = target[target.index("<") + 1 : target.rindex(">")]
    target = target.lstrip("~").removesuffix("()")
    if target.startswith("dask_labelissues"):
        return _exists(target)
    if target.startswith("."):
        return any(_exists(name + target) for name in MODULES)
    head, _, rest = target.partition(".")
    space = vars(module)
    if head in space:
        return not rest or _exists(f"{getattr(space[head], '__name__', '')}.{rest}") or _has_path(space[head], rest)
    return any(inspect.isclass(v) and v.__module__ == module.__name__ and _has(v, head) for v in space.values())


def _has_path(obj: object, rest: str) -> bool:
    for part in rest.split("."):
        if not _has(obj, part):
            return False
        obj = getattr(obj, part, None)
    return True


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_reference_names_something_that_exists(name):
    module = MODULES[name]
    source = inspect.getsource(module)
    broken = [
        f"line {source.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
        for m in REFERENCE.finditer(source)
        if not _resolves(m.group(1), module)
    ]
    assert not broken, "\n".join(broken)


def test_a_moved_function_is_caught():
    # The check itself: a reference to where a function used to be fails.
    blocks = MODULES["dask_labelissues.engines.blocks"]
    assert _resolves("dask_labelissues.engines.blocks.dask_block_rows", blocks)
    assert not _resolves("dask_labelissues.inputs.dask_block_rows", blocks)
    assert _resolves(".blocks.BlockReader", blocks)
    assert not _resolves(".inputs.BlockReader", blocks)
    assert _resolves("plan_blocks", blocks)
    assert not _resolves("run_filter", blocks)
