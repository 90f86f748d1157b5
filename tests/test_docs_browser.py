"""The built documentation as a reader sees it.

One Sphinx build (warnings are errors) serves every test here. Without a browser: every
internal link and anchor resolves, and no page loads a script or a style sheet from the
network. With headless Chromium (Debian's ``chromium`` package; ``HSOFTMAX_CHROMIUM`` names
another binary): the main pages are opened from disk, offline, and fail on console errors,
resources that do not load, Furo's error boxes, raw TeX, content cut off at the right and
shrunken plots; each page is also screenshotted (into ``HSOFTMAX_DOCS_SCREENSHOTS`` when set).
The browser tests are skipped where no Chromium is installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

#: The pages a reader opens first, and the tallest page each may be (px at 1280 px wide).
MAIN_PAGES = {
    "index.html": 6_000,
    "quickstart.html": 8_000,
    "guide/maths.html": 12_000,
    "api.html": 60_000,
    "benchmarks.html": 8_000,
    "benchmarks_details.html": 40_000,
    "paper.html": 10_000,
}
WIDTH, HEIGHT = 1280, 900


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The HTML site, built once for this module with ``-W`` (any warning fails the build)."""
    for name in ("sphinx", "furo", "myst_parser"):
        pytest.importorskip(name)
    out = tmp_path_factory.mktemp("docs") / "html"
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-E", "-b", "html",
         str(DOCS), str(out)],
        capture_output=True, text=True, env=_env(), timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def test_sphinx_build_has_no_warnings(site: Path) -> None:
    for page in MAIN_PAGES:
        assert (site / page).is_file(), page


# -- static checks: links, anchors, nothing remote ---------------------------------------------


class _Page(HTMLParser):
    """The ids of one HTML page and the local URLs it refers to."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.links: list[str] = []
        self.remote_assets: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = {k: v or "" for k, v in attrs}
        for key in ("id", "name") if tag != "meta" else ():
            if attr.get(key):
                self.ids.add(attr[key])
        url = attr.get("href") if tag in ("a", "link") else attr.get("src")
        if not url:
            return
        scheme = urlsplit(url).scheme
        if scheme in ("http", "https") or url.startswith("//"):
            if tag == "script" or (tag == "link" and "stylesheet" in attr.get("rel", "")):
                self.remote_assets.append(url)
        elif not scheme and tag in ("a", "link", "img", "script"):
            self.links.append(url)


def _parse(path: Path, cache: dict[Path, _Page]) -> _Page:
    if path not in cache:
        page = _Page()
        page.feed(path.read_text(errors="replace"))
        cache[path] = page
    return cache[path]


def test_internal_links_and_anchors_resolve(site: Path) -> None:
    """Every local link of every page (sources, index and search included) reaches a file, and
    every ``#anchor`` an element with that id."""
    cache: dict[Path, _Page] = {}
    broken: list[str] = []
    for path in sorted(site.rglob("*.html")):
        for url in _parse(path, cache).links:
            parts = urlsplit(url)
            target = (path.parent / unquote(parts.path)).resolve() if parts.path else path
            if target.is_dir():
                target = target / "index.html"
            where = f"{path.relative_to(site)}: {url}"
            if not target.exists():
                broken.append(f"{where} (no such file)")
            elif (parts.fragment and target.suffix == ".html"
                  and unquote(parts.fragment) not in _parse(target, cache).ids):
                broken.append(f"{where} (no such anchor)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_pages_load_nothing_from_the_network(site: Path) -> None:
    """Scripts and style sheets (MathJax included) are served from the site itself, so that the
    documentation reads the same offline."""
    cache: dict[Path, _Page] = {}
    remote = sorted({f"{p.relative_to(site)}: {u}" for p in site.rglob("*.html")
                     for u in _parse(p, cache).remote_assets})
    assert not remote, ("remote scripts or style sheets (is the docs extra's "
                        "sphinx-mathjax-offline installed?):\n" + "\n".join(remote))
    assert (site / "_static" / "mathjax" / "tex-chtml.js").is_file() or (
        site / "_static" / "mathjax" / "es5" / "tex-chtml.js").is_file()


# -- in a browser --------------------------------------------------------------------------------

#: Injected first into each page: records errors from the start, and once the page has loaded
#: and MathJax has typeset it, writes what it found into the DOM for ``--dump-dom`` to return.
PROBE = r"""
<script>
(function () {
  var problems = [];
  var say = function (what) { problems.push(String(what).slice(0, 300)); };
  var consoleError = console.error;
  console.error = function () {
    say("console error: " + Array.prototype.join.call(arguments, " "));
    return consoleError.apply(console, arguments);
  };
  window.addEventListener("error", function (e) {
    var el = e.target;
    if (el && el !== window && (el.src || el.href)) { say("did not load: " + (el.src || el.href)); }
    else { say("uncaught error: " + e.message); }
  }, true);
  window.addEventListener("unhandledrejection", function (e) {
    say("unhandled rejection: " + e.reason);
  });
  var name = function (el) {
    var text = (el.textContent || "").replace(/\s+/g, " ").trim().slice(0, 70);
    var cls = el.className ? "." + String(el.className).split(" ")[0] : "";
    return el.tagName.toLowerCase() + cls + " '" + text + "'";
  };
  var check = function () {
    var article = document.querySelector("article") || document.body;
    var boxes = ".contents:not(.this-will-duplicate-information-and-it-is-still-useful-here)," +
                " .system-message, .problematic";
    document.querySelectorAll(boxes).forEach(function (el) {
      say("error box: " + name(el));
    });
    document.querySelectorAll(".math").forEach(function (el) {
      if (!el.querySelector("mjx-container")) { say("raw TeX: " + name(el)); }
    });
    document.querySelectorAll("mjx-merror").forEach(function (el) {
      say("TeX error: " + name(el));
    });
    var walker = document.createTreeWalker(article, NodeFilter.SHOW_TEXT);
    var tex = new RegExp("\\\\(frac|sum|log|operatorname|mathrm|mathbb|lfloor|bmod|cdot|times" +
                         "|qquad|texttt)\\b|\\\\\\(|\\\\\\[|\\$\\$");
    for (var node = walker.nextNode(); node; node = walker.nextNode()) {
      if (!node.parentElement.closest("pre, code, .math, mjx-container, script, style, .highlight")
          && tex.test(node.nodeValue)) {
        say("raw TeX in text: " + node.nodeValue.trim().slice(0, 80));
      }
    }
    article.querySelectorAll("pre, .table-wrapper, div.math, mjx-container[display='true'], .sig")
      .forEach(function (el) {
        if (el.scrollWidth > el.clientWidth + 2) {
          say("cut off at the right: " + name(el) + " (" + el.scrollWidth + " px in " +
              el.clientWidth + ")");
        }
      });
    var right = article.getBoundingClientRect().right;
    article.querySelectorAll("img").forEach(function (img) {
      if (!img.complete || img.naturalWidth === 0) { say("image not loaded: " + img.src); return; }
      var figure = img.closest("figure");
      var full = figure && figure.querySelector("a.download, a.reference.download");
      if (img.clientWidth < 0.75 * img.naturalWidth && !full) {
        var scale = Math.round(100 * img.clientWidth / img.naturalWidth);
        say("plot shrunk to " + scale + "%: " + img.src);
      }
      if (img.getBoundingClientRect().right > right + 2) {
        say("image past the column: " + img.src);
      }
    });
    var out = document.createElement("script");
    out.type = "application/json";
    out.id = "hsoftmax-docs-check";
    var height = document.documentElement.scrollHeight;
    out.textContent = JSON.stringify({problems: problems, height: height});
    document.body.appendChild(out);
  };
  window.addEventListener("load", function () {
    var mj = window.MathJax;
    var ready = mj && mj.startup && mj.startup.promise ? mj.startup.promise : Promise.resolve();
    ready.then(check, function (e) { say("MathJax failed: " + e); check(); });
  });
})();
</script>
"""

RESULT = re.compile(r'<script type="application/json" id="hsoftmax-docs-check">(.*?)</script>',
                    re.S)


def _chromium() -> str | None:
    names = [os.environ.get("HSOFTMAX_CHROMIUM", ""), "chromium", "chromium-browser",
             "google-chrome", "google-chrome-stable"]
    return next((found for name in names if name and (found := shutil.which(name))), None)


def _browse(browser: str, url: str, *action: str,
            height: int = HEIGHT) -> subprocess.CompletedProcess[str]:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--hide-scrollbars", "--enable-logging=stderr", "--v=0",
             f"--window-size={WIDTH},{height}", "--virtual-time-budget=15000"]
    return subprocess.run([browser, *flags, *action, url], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def browser() -> str:
    found = _chromium()
    if found is None:
        pytest.skip("no Chromium (apt-get install chromium) to open the built pages")
    return found


@pytest.fixture(scope="module")
def probed_site(site: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the site whose main pages carry the probe."""
    copy = tmp_path_factory.mktemp("probed") / "html"
    shutil.copytree(site, copy)
    for page in MAIN_PAGES:
        path = copy / page
        path.write_text(path.read_text().replace("<head>", "<head>" + PROBE, 1))
    return copy


@pytest.mark.parametrize("page", list(MAIN_PAGES))
def test_page_reads_well_in_a_browser(browser: str, site: Path, probed_site: Path,
                                      page: str, tmp_path: Path) -> None:
    """Offline, in headless Chromium: no console error, failed load, error box, raw TeX,
    content cut off at the right or shrunken plot, and not overly tall."""
    result = _browse(browser, (probed_site / page).as_uri(), "--dump-dom")
    found = RESULT.search(result.stdout)
    assert found, f"the probe did not report (exit {result.returncode}):\n{result.stderr[-2000:]}"
    report = json.loads(found.group(1))
    problems = list(report["problems"])
    problems += [line for line in result.stderr.splitlines()
                 if ":CONSOLE" in line and ("rror" in line or "Failed" in line)]
    if report["height"] > MAIN_PAGES[page]:
        problems.append(f"{report['height']} px tall (at most {MAIN_PAGES[page]})")

    shots = Path(os.environ.get("HSOFTMAX_DOCS_SCREENSHOTS", tmp_path))
    shot = shots / (page.replace("/", "_").removesuffix(".html") + ".png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    # The page as built (no probe), its first 4,000 px at most.
    _browse(browser, (site / page).as_uri(), f"--screenshot={shot}",
            height=max(HEIGHT, min(report["height"], 4_000)))
    assert shot.is_file() and shot.stat().st_size > 10_000, f"no screenshot of {page}"

    assert not problems, f"{page}:\n" + "\n".join(problems)
