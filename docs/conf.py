"""Sphinx configuration of the hsoftmax documentation.

Build: ``sphinx-build -W -b html docs docs/_build/html`` (warnings are errors). No network is
needed, to build or to read: the PyTorch intersphinx inventory is written locally by
``_inv/make_torch_inv.py``, and MathJax is copied into the site from the ``sphinx-mathjax-offline``
package (the ``docs`` extra) instead of being loaded from a CDN.
"""

from __future__ import annotations

import importlib.util
import os
import re
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
html_static_path: list[str] = ["_static"]
html_css_files = ["hsoftmax.css"]


# -- math, served from the site itself -------------------------------------------------------------
def _local_mathjax() -> tuple[Path, str] | None:
    """A static folder holding ``mathjax/`` and the path of MathJax's loader inside it.

    ``sphinx-mathjax-offline`` (MathJax 3.2.2) is the ``docs`` extra's copy; the static files of
    ``django-static-mathjax`` (MathJax 3.2.2 as well, importable as ``mathjax``) also serve.
    """
    candidates = [("sphinx-mathjax-offline", "static", "mathjax/tex-chtml.js"),
                  ("mathjax", "static", "mathjax/es5/tex-chtml.js")]
    for module, folder, script in candidates:
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            continue
        for location in (spec.submodule_search_locations or []) if spec else []:
            static = Path(location) / folder
            if (static / script).is_file():
                return static, script
    return None


_MATHJAX = _local_mathjax()
if _MATHJAX is not None:
    # Sphinx copies every static folder into _static/, so MathJax lands in _static/mathjax/ with
    # its fonts and extensions beside it, and the pages load it by a relative path.
    html_static_path.append(str(_MATHJAX[0]))
    mathjax_path = _MATHJAX[1]
# Without a local copy the pages fall back to Sphinx's CDN default; the browser check of the
# test suite then fails on raw TeX when the machine is offline.


# -- pages assembled at build time ---------------------------------------------------------------
BENCH_RESULTS = Path(os.environ.get("HSOFTMAX_BENCH_RESULTS", ROOT / "benchmarks" / "results"))

#: The plots of the benchmarks page, in order, where they exist: one panel each, so that they are
#: shown at their natural size. Every other table and plot is on the details page.
LEAD_PLOTS = [
    ("train_cpu.png", "Training step, PlantCLEF head (80,000 classes), 2-core CPU"),
    ("scaling_cpu.png", "Training step against the number of classes, 2-core CPU"),
    ("contention_cpu.png", "Training step beside a busy core, 2-core CPU"),
]

#: Generated files that the details page links to instead of including (long run logs).
LINKED_ONLY = {"history_cpu", "history_cuda"}


def _rel(path: Path) -> str:
    return os.path.relpath(path, DOCS).replace(os.sep, "/")  # paths in a page: relative to docs/


def _lead_plots() -> str:
    """Markdown for the benchmarks page's plots (committed PNGs only; missing ones are left out)."""
    parts = []
    for name, caption in LEAD_PLOTS:
        png = BENCH_RESULTS / name
        if png.exists():
            parts.append(f"\n```{{figure}} {_rel(png)}\n:alt: {caption}\n\n{caption}.\n```\n")
    return "".join(parts)


def _benchmark_sections() -> str:
    """Markdown that includes every generated benchmark table and plot, summaries first."""
    tables = sorted(
        (p for p in BENCH_RESULTS.glob("*.md") if p.stem not in LINKED_ONLY),
        key=lambda p: (not p.stem.startswith("summary"), p.stem.endswith("_cuda"), p.stem),
    )
    if not tables:
        return "\nNo benchmark results are committed yet: run the commands above.\n"
    parts = []
    for table in tables:  # each generated table starts with its own "# " title
        parts.append(f"\n```{{include}} {_rel(table)}\n:heading-offset: 1\n```\n")
        png = table.with_suffix(".png")
        if png.exists():
            parts.append(
                f"\n```{{figure}} {_rel(png)}\n:alt: {table.stem}\n\n"
                f"{table.stem}: the plot of the table above "
                f"({{download}}`full size <{_rel(png)}>`).\n```\n"
            )
    return "".join(parts)


PLACEHOLDERS = {
    "benchmarks": ("<!-- lead-plots -->", _lead_plots),
    "benchmarks_details": ("<!-- all-results -->", _benchmark_sections),
}


def _source_read(app, docname: str, source: list[str]) -> None:
    """Put the generated benchmark plots and tables in place of the pages' placeholders."""
    if docname in PLACEHOLDERS:
        marker, make = PLACEHOLDERS[docname]
        source[0] = source[0].replace(marker, make())


_VIEWCODE_BACKLINK = re.compile(
    r'(<div class="viewcode-block" id="(?P<name>[^"]+)">\s*<a class="viewcode-back" href=")'
    r'(?P<page>[^"#]+)#(?P<anchor>[^"]+)"'
)
_ID = re.compile(r'\bid="([^"]+)"')


def _fix_viewcode_backlinks(app, exception: Exception | None) -> None:
    """Point each ``[docs]`` link of the highlighted sources at the entry that exists.

    ``sphinx.ext.viewcode`` keeps one reference prefix per module: once ``hsoftmax.functional``
    has been reached through ``hsoftmax.HierarchicalOutput``, it links its functions to
    ``api.html#hsoftmax.topk`` whereas their entries are ``hsoftmax.functional.topk``. Each
    link whose anchor is missing is pointed at ``<module>.<name>`` when that anchor exists.
    """
    if exception is not None or app.builder.format != "html":
        return
    out = Path(app.outdir)
    ids: dict[Path, set[str]] = {}

    def anchors(page: Path) -> set[str]:
        if page not in ids:
            ids[page] = set(_ID.findall(page.read_text())) if page.is_file() else set()
        return ids[page]

    for source in (out / "_modules").rglob("*.html"):
        module = ".".join(source.relative_to(out / "_modules").with_suffix("").parts)
        text = source.read_text()

        def fix(match: re.Match[str], source: Path = source, module: str = module) -> str:
            target = anchors((source.parent / match["page"]).resolve())
            wanted = f"{module}.{match['name']}"
            if match["anchor"] in target or wanted not in target:
                return match.group(0)
            return f'{match.group(1)}{match["page"]}#{wanted}"'

        fixed = _VIEWCODE_BACKLINK.sub(fix, text)
        if fixed != text:
            source.write_text(fixed)


def setup(app) -> dict[str, bool]:
    """Register the build-time hooks."""
    app.connect("source-read", _source_read)
    app.connect("build-finished", _fix_viewcode_backlinks)
    return {"parallel_read_safe": True}
