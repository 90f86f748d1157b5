"""The documentation: the code blocks of the README and the docs, the docstring examples of
every module, the API page's completeness, and the generated tables being current. The Sphinx
build itself, its links and how its pages read in a browser are in ``test_docs_browser.py``."""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import os
import pkgutil
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

import hsoftmax

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

#: Pages whose code blocks other tests own (the production guide is tested with its recipes).
NOT_HERE = {DOCS / "guide" / "production.md"}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _load_script(path: Path) -> ModuleType:
    name = f"_docs_script_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


# -- code blocks -------------------------------------------------------------------------------

BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
PAGES = [ROOT / "README.md", *sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)]


@pytest.mark.parametrize("page", [p for p in PAGES if p not in NOT_HERE],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_code_blocks_run(page: Path) -> None:
    """The python blocks of one page run in order, in one namespace, as a reader would."""
    blocks = BLOCK.findall(page.read_text())
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem}"}
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"{page.name}[block {i}]", "exec"), namespace)
        except Exception as error:  # pragma: no cover - the message is the point
            raise AssertionError(f"{page.relative_to(ROOT)}, python block {i} failed: "
                                 f"{type(error).__name__}: {error}") from error


def test_readme_has_a_python_example() -> None:
    assert BLOCK.findall((ROOT / "README.md").read_text())


def test_quickstart_includes_the_readme_example() -> None:
    """The quickstart includes the README's example between these two headings: one copy."""
    quickstart = (DOCS / "quickstart.md").read_text()
    start = re.search(r':start-after: "(.*)"', quickstart)
    end = re.search(r':end-before: "(.*)"', quickstart)
    assert start and end
    readme = (ROOT / "README.md").read_text()
    assert start.group(1) in readme and end.group(1) in readme
    between = readme.split(start.group(1), 1)[1].split(end.group(1), 1)[0]
    assert BLOCK.findall(between), "the included README section holds no python example"


# -- doctests of every module ------------------------------------------------------------------

MODULES = sorted(
    f"hsoftmax.{m.name}" for m in pkgutil.iter_modules(hsoftmax.__path__) if m.name != "py"
)


@pytest.mark.parametrize("module", ["hsoftmax", *MODULES])
def test_doctests(module: str) -> None:
    result = doctest.testmod(
        importlib.import_module(module),
        optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS,
        verbose=False,
    )
    assert result.failed == 0


# -- the API page lists every public name --------------------------------------------------------


def test_api_reference_lists_every_public_name() -> None:
    """Each name of ``hsoftmax.__all__`` and of every module's ``__all__`` has an entry, under
    the package root or the module that defines it."""
    api = (DOCS / "api.rst").read_text()
    documented = set(re.findall(r"^\.\. (?:auto\w+|py:\w+):: ([\w.]+)", api, re.MULTILINE))

    def listed(module: str, name: str) -> bool:
        obj = getattr(importlib.import_module(module), name)
        home = getattr(obj, "__module__", module) if callable(obj) else module
        return bool({f"{module}.{name}", f"{home}.{name}", f"hsoftmax.{name}"} & documented)

    missing = [f"hsoftmax.{n}" for n in hsoftmax.__all__
               if n != "functional" and not listed("hsoftmax", n)]
    for module in MODULES:
        for name in getattr(importlib.import_module(module), "__all__", []):
            if not listed(module, name):
                missing.append(f"{module}.{name}")
    assert not missing, f"not in docs/api.rst: {missing}"


# -- generated files are current ---------------------------------------------------------------


def test_generated_tables_are_current() -> None:
    tables = _load_script(DOCS / "scripts" / "tables.py")
    for name, text in tables.outputs().items():
        committed = DOCS / "generated" / name
        assert committed.read_text() == text, f"run: python docs/scripts/tables.py ({name})"


def test_torch_inventory_is_current() -> None:
    inv = _load_script(DOCS / "_inv" / "make_torch_inv.py")
    assert (DOCS / "_inv" / "torch.inv").read_bytes() == inv.inventory_bytes()
    python = inv.inventory_bytes("Python", inv.PYTHON_ENTRIES)
    assert (DOCS / "_inv" / "python.inv").read_bytes() == python


def test_routing_script_quick() -> None:
    script = _load_script(DOCS / "scripts" / "routing_vs_argmax.py")
    script.main(["--quick"])
    table = (DOCS / "generated" / "routing_vs_argmax.md").read_text()
    assert "python docs/scripts/routing_vs_argmax.py" in table
