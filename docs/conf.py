"""Sphinx configuration of the hsoftmax documentation.

Build: ``sphinx-build -W -b html docs docs/_build/html`` (warnings are errors). No network is
needed: the PyTorch intersphinx inventory is written locally by ``_inv/make_torch_inv.py``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(DOCS / "_inv"))

from make_torch_inv import PYTHON_ENTRIES, write_inventory  # noqa: E402

import hsoftmax  # noqa: E402

project = "hsoftmax"
author = "The hsoftmax developers"
copyright = "The hsoftmax developers, MIT License"
release = hsoftmax.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.intersphinx",
    "sphinx.ext.viewcode",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_inv", "scripts", "generated/*.csv", "Thumbs.db", ".DS_Store"]

# -- autodoc / napoleon ------------------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
autodoc_default_options = {"undoc-members": False, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_custom_sections = ["Shape"]

# -- intersphinx (offline) ---------------------------------------------------------------------
intersphinx_mapping = {
    "torch": (
        "https://pytorch.org/docs/stable/",
        str(write_inventory(DOCS / "_inv" / "torch.inv")),
    ),
    "python": (
        "https://docs.python.org/3/",
        str(write_inventory(DOCS / "_inv" / "python.inv", "Python", PYTHON_ENTRIES)),
    ),
}
intersphinx_timeout = 1

# -- MyST --------------------------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# -- HTML --------------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"hsoftmax {release}"
html_static_path: list[str] = []


# -- pages assembled at build time ---------------------------------------------------------------
BENCH_RESULTS = Path(os.environ.get("HSOFTMAX_BENCH_RESULTS", ROOT / "benchmarks" / "results"))


def _benchmark_sections() -> str:
    """Markdown that includes every generated benchmark table and plot, summaries first."""
    tables = sorted(
        BENCH_RESULTS.glob("*.md"), key=lambda p: (not p.stem.startswith("summary"), p.stem)
    )
    if not tables:
        return "\nNo benchmark results are committed yet: run the commands above.\n"
    parts = []
    for table in tables:  # each generated table starts with its own "# " title
        rel = os.path.relpath(table, DOCS)  # paths in the page are relative to docs/
        parts.append(f"\n```{{include}} {rel}\n:heading-offset: 1\n```\n")
        png = table.with_suffix(".png")
        if png.exists():
            parts.append(f"\n![{table.stem}]({os.path.relpath(png, DOCS)})\n")
    return "".join(parts)


def _source_read(app, docname: str, source: list[str]) -> None:
    """Append the generated benchmark tables and plots to the benchmarks page."""
    if docname == "benchmarks":
        source[0] += _benchmark_sections()


def setup(app) -> dict[str, bool]:
    """Register the build-time hooks."""
    app.connect("source-read", _source_read)
    return {"parallel_read_safe": True}
