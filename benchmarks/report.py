"""Turn the benchmark CSVs into markdown tables, plots and the README's headline table.

For every ``<suite>_<device>[_<preset>].csv`` in the results folder this writes ``<stem>.md``
(one table per task, with ratios against flat and gather+bmm computed here) and ``<stem>.png``;
then ``summary_<device>[_<preset>].md``, the project's targets against the measured ratios; and,
from the CPU CSVs of the full preset, the table between ``<!-- headline:start -->`` and
``<!-- headline:end -->`` in the README. Nothing is typed by hand.

    python benchmarks/report.py                       # benchmarks/results, and the README
    python benchmarks/report.py --results benchmarks/results/tmp --readme ''
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from harness import quantile, read_csv  # noqa: E402

Row = dict[str, str]
SUITES = ("train", "inference", "scaling", "contention")
STEM = re.compile(rf"^({'|'.join(SUITES)})_(cpu|cuda)(_\w+)?$")
ORDER = ("flat", "linear_ce", "flat_bottleneck", "adaptive", "gather_bmm", "hsoftmax",
         "hsoftmax_sparse", "hsoftmax_reference")
COLORS = {"flat": "#7f7f7f", "linear_ce": "#9467bd", "flat_bottleneck": "#bcbd22",
          "adaptive": "#17becf", "gather_bmm": "#ff7f0e", "hsoftmax": "#1f77b4",
          "hsoftmax_sparse": "#2ca02c", "hsoftmax_reference": "#aec7e8"}
TITLES = {
    "train": "training step (forward, backward, optimizer)",
    "log_probs": "exact log-probabilities of all classes",
    "topk5": "exact top-5",
    "topk5_trained": "exact top-5, hierarchical head trained on structured data",
    "predict": "predict (argmax; top-1 routing for the two-level heads)",
}
README_START, README_END = "<!-- headline:start -->", "<!-- headline:end -->"


def _f(v: str | None) -> float | None:
    try:
        x = float(v or "")
    except ValueError:
        return None
    return None if math.isnan(x) else x


def _fmt(x: float | None, unit: str = "") -> str:
    if x is None:
        return ""
    return (f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}") + unit


def _label(r: Row) -> str:
    v = f" ({r['variant']})" if r["variant"] and r["variant"] != "adamw_fused" else ""
    return f"{r['method']}{v}" + (f", {r['threads']} thread" if r["threads"] == "1" else "")


def _sorted(rows: Sequence[Row]) -> list[Row]:
    def key(r: Row) -> tuple[int, str, int, str, int]:
        m = ORDER.index(r["method"]) if r["method"] in ORDER else 99
        return (int(r["classes"]), r["contention"], m, r["variant"], -int(r["threads"] or 0))

    return sorted(rows, key=key)


# --------------------------------------------------------------------------- ratios


def reference(rows: Sequence[Row], row: Row, method: str) -> Row:
    """The row of ``method`` answering the same question as ``row``: same task, classes, batch
    and load; the dense fused-AdamW step for training, the plain call for inference; the same
    thread count where there is one."""
    variant = "adamw_fused" if row["task"] == "train" else ""
    hits = [r for r in rows if r["method"] == method and r["task"] == row["task"]
            and r["variant"] == variant and r["classes"] == row["classes"]
            and r["batch"] == row["batch"] and r["contention"] == row["contention"]]
    same = [r for r in hits if r["threads"] == row["threads"]]
    return (same or hits or [{}])[0]


def ratio(ref: Row, row: Row, column: str = "time_ms") -> float | None:
    """``ref``'s value over ``row``'s: above 1, ``row`` is faster (or smaller)."""
    a, b = _f(ref.get(column)), _f(row.get(column))
    return a / b if a and b else None


def ratio_range(ref: Row, row: Row) -> str:
    """Where the ratio lands within the timings' spread: ``ref``'s first quartile over
    ``row``'s third, to ``ref``'s third over ``row``'s first."""
    q = [_f(ref.get("q25_ms")), _f(ref.get("q75_ms")), _f(row.get("q25_ms")),
         _f(row.get("q75_ms"))]
    if not all(q):
        return ""
    r25, r75, q25, q75 = (float(x or 0) for x in q)
    return f"{r25 / q75:.2f}-{r75 / q25:.2f}x"


# --------------------------------------------------------------------------- tables


def environment(rows: Sequence[Row]) -> str:
    r = rows[0]
    dates = sorted({x["date"] for x in rows if x["date"]})
    commits = sorted({x["commit"] for x in rows if x["commit"]})
    lines = [f"- {r['device']} ({r['device_name']}), {r['dtype']}, torch {r['torch']}, "
             f"threads {', '.join(sorted({x['threads'] for x in rows}))}",
             f"- {dates[0] if dates else '?'}"
             + (f" to {dates[-1]}" if len(dates) > 1 else "")
             + f", commit {', '.join(commits) or '?'}"]
    if any("shared" in x["contention"] for x in rows):
        lines.append("- **taken on a shared machine** (other jobs running): times are "
                     "distorted; ratios come from the same interleaved rounds")
    return "\n".join(lines)


def table(rows: Sequence[Row], all_rows: Sequence[Row]) -> str:
    head = ["method", "classes", "load", "time (ms)", "quartiles (ms)", "runs", "vs flat",
            "vs gather+bmm", "peak (MB)", "verified", "note"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in _sorted(rows):
        vs = [ratio(reference(all_rows, r, m), r) for m in ("flat", "gather_bmm")]
        quart = (f"{_fmt(_f(r['q25_ms']))}-{_fmt(_f(r['q75_ms']))}" if r["q25_ms"] else "")
        note = f"**skipped**: {r['skip_reason']}" if r["skip_reason"] else r["note"]
        batch = "" if r["batch"] == all_rows[0]["batch"] else f" (batch {r['batch']})"
        cells = [f"`{_label(r)}`", f"{int(r['classes']):,}{batch}", r["contention"],
                 _fmt(_f(r["time_ms"])), quart, r["runs"],
                 *(f"{x:.2f}x" if x else "" for x in vs), _fmt(_f(r["peak_mb"])),
                 r["verified"], note.replace("|", "\\|")]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def contention_table(rows: Sequence[Row]) -> str:
    """Each method's time per load, its ratio to flat under the same load, and its slowdown
    against its own quiet time."""
    loads = sorted({r["contention"] for r in rows},
                   key=lambda x: (x.split("+")[0] != "none", x))  # quiet first
    head = ["task", "method", *(f"{x}: ms (vs flat)" for x in loads),
            *(f"{x} / quiet" for x in loads[1:])]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = dict.fromkeys((r["task"], r["method"], r["variant"], r["threads"])
                         for r in sorted(_sorted(rows), key=lambda r: r["task"] != "train"))
    for task, method, variant, threads in keys:
        mine = {r["contention"]: r for r in rows if (r["task"], r["method"], r["variant"],
                                                      r["threads"]) == (task, method, variant,
                                                                        threads)}
        cells = [task, f"`{_label(next(iter(mine.values())))}`"]
        for load in loads:
            r = mine.get(load, {})
            vs = ratio(reference(rows, r, "flat"), r) if r else None
            cells.append(_fmt(_f(r.get("time_ms"))) + (f" ({vs:.1f}x)" if vs else ""))
        quiet = mine.get(loads[0], {})
        cells += [f"{x:.2f}x" if (x := ratio(mine.get(load, {}), quiet)) else ""
                  for load in loads[1:]]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def markdown(stem: str, rows: Sequence[Row]) -> str:
    parts = [f"# {stem}", "", f"Written by `benchmarks/report.py` from `{stem}.csv`.", "",
             environment(rows), "",
             "vs flat, vs gather+bmm: the baseline's median time over this row's, for the "
             "same task, classes and load (above 1: faster than the baseline). Peak: the "
             "process's peak RSS above a worker warmed up on a tiny head (GPU: allocated "
             "memory)."]
    if stem.startswith("contention"):
        parts += ["", "Loads: `none` (quiet), `gemm` (a process multiplying float32 matrices "
                  "on one thread), `python` (a process spinning in plain Python).", "",
                  contention_table(rows)]
    for task in dict.fromkeys(r["task"] for r in rows):
        parts += ["", f"## {task}: {TITLES.get(task, task)}", "",
                  table([r for r in rows if r["task"] == task], rows)]
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------- plots


def _figure(rows: Sequence[Row], path: Path, fig: Any) -> Path:
    r0 = rows[0]
    fig.text(0.99, 0.01, f"{r0['device_name']}, torch {r0['torch']}, batch {r0['batch']}",
             ha="right", fontsize=8, color="0.4")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def plots(suite: str, rows: Sequence[Row], stem: Path) -> list[Path]:
    """Legible single-panel figures: bars of the main head's times (train, inference,
    contention), lines of step time and peak memory against classes (scaling)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    if suite == "scaling":
        for column, what, name in (("time_ms", "training step (ms)", ""),
                                   ("peak_mb", "peak training memory (MB)", "_memory")):
            fig, ax = plt.subplots(figsize=(8, 5.5))
            batch = rows[0]["batch"]  # the preset's; the big-batch rows are in the tables
            for m in ORDER:
                pts = sorted((int(r["classes"]), float(r[column])) for r in rows
                             if r["method"] == m and r["task"] == "train" and _f(r[column])
                             and r["batch"] == batch)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=m, color=COLORS[m])
            if not ax.lines:
                plt.close(fig)
                continue
            ax.set(xscale="log", yscale="log", xlabel="classes", ylabel=f"{what}, log scale",
                   title=f"{what[0].upper()}{what[1:]} against classes")
            ax.legend()
            ax.grid(True, which="both", alpha=0.3)
            out.append(_figure(rows, stem.with_name(stem.name + name + ".png"), fig))
        return out
    task = {"train": "train", "inference": "topk5", "contention": "train"}[suite]
    main, batch = int(rows[0]["classes"]), rows[0]["batch"]
    picked = [r for r in _sorted(rows) if r["task"] == task and _f(r["time_ms"])
              and int(r["classes"]) == main and r["batch"] == batch]
    if not picked:
        return []
    labels = [_label(r) + (f" + {r['contention']}" if suite == "contention" else "")
              for r in picked]
    values = [float(r["time_ms"]) for r in picked]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(picked) + 1.5))
    ax.barh(range(len(values)), values, color=[COLORS.get(r["method"], "k") for r in picked])
    ax.set_yticks(range(len(values)), labels)
    ax.invert_yaxis()
    ax.set_xscale("log")
    for i, v in enumerate(values):
        ax.text(v, i, f" {_fmt(v)} ms", va="center")
    ax.set(xlabel="milliseconds per batch, log scale",
           title=f"{TITLES[task]}, {main:,} classes"
           + (", quiet and beside a busy core" if suite == "contention" else ""))
    ax.grid(True, axis="x", which="both", alpha=0.3)
    return [_figure(rows, stem.with_suffix(".png"), fig)]


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """``method``/``variant``'s time against ``versus``'s, in ``suite``; met when the ratio
    (``versus`` over ``method``) is at least ``bound``."""

    what: str
    suite: str
    task: str
    method: str
    variant: str
    versus: str
    versus_variant: str
    bound: float
    contention: str = "none"


TARGETS = (
    Target("exact top-5, untrained head, against `head.log_probs(x).topk(5)` (at most 10% "
           "slower)", "inference", "topk5", "hsoftmax", "", "hsoftmax", "via_log_probs",
           1 / 1.1),
    Target("exact top-5, untrained head, against flat `Linear(1792, C)` top-5", "inference",
           "topk5", "hsoftmax", "", "flat", "", 5),
    Target("train step, fused AdamW, against the flat step", "train", "train", "hsoftmax",
           "adamw_fused", "flat", "adamw_fused", 60),
    Target("train step, fused AdamW, against plain gather+bmm", "train", "train", "hsoftmax",
           "adamw_fused", "gather_bmm", "adamw_fused", 1.5),
)


def _pick(rows: Sequence[Row], task: str, method: str, variant: str, contention: str = "none",
          classes: int | None = None, threads: str | None = None) -> Row:
    hits = [r for r in rows if r["task"] == task and r["method"] == method
            and r["variant"] == variant and r["contention"].split("+")[0] == contention
            and (classes is None or int(r["classes"]) == classes)
            and (threads is None or r["threads"] == threads)]
    return hits[0] if hits else {}


def summary(tables: dict[str, list[Row]], title: str) -> str:
    """The project's targets against the measured ratios, then the contention results."""
    first = next((rs[0] for rs in tables.values() if rs), {})
    lines = [f"# Targets: {title}", "",
             "Written by `benchmarks/report.py` from the CSVs beside this file. The targets are "
             f"set for a 2-core CPU with 2 threads; measured on {first.get('device_name', '?')}, "
             f"torch {first.get('torch', '?')}, batch {first.get('batch', '?')}.", "",
             "| target | measured | quartile range | required | met | source |",
             "|---|---|---|---|---|---|"]
    for t in TARGETS:
        rows = tables.get(t.suite, [])
        mine = _pick(rows, t.task, t.method, t.variant, t.contention)
        ref = _pick(rows, t.task, t.versus, t.versus_variant, t.contention,
                    int(mine["classes"]) if mine else None, mine.get("threads"))
        x = ratio(ref, mine)
        required = (f"<= {1 / t.bound:.2f}x its time" if t.bound < 1 else f">= {t.bound:g}x")
        if x is None:
            why = mine.get("skip_reason") or ref.get("skip_reason") or "not measured"
            lines.append(f"| {t.what} | {why} | | {required} | - | {t.suite} |")
            continue
        shown = f"{1 / x:.2f}x its time" if t.bound < 1 else f"{x:.2f}x"
        spread = ratio_range(ref, mine)
        if t.bound < 1 and spread:
            lo, hi = (float(v) for v in spread.rstrip("x").split("-"))
            spread = f"{1 / hi:.2f}-{1 / lo:.2f}x"
        shared = " (shared machine)" if "shared" in mine["contention"] else ""
        lines.append(f"| {t.what} | {shown}{shared} | {spread} | {required} | "
                     f"{'yes' if x >= t.bound else '**no**'} | {t.suite}, "
                     f"{mine['date'][:10]}, `{mine['commit']}` |")
    lines += ["", "Quartile range: the baseline's first quartile over the head's third, to its "
              "third over the head's first: how far the ratio moves within the timings' spread."]
    extra = _linear_ce_lines(tables.get("scaling", []) + tables.get("train", []))
    if extra:
        lines += ["", "## Flat head trained with `F.linear_cross_entropy`", "", *extra]
    if tables.get("contention"):
        lines += ["", "## Under CPU contention", "",
                  "Each row beside a process busy on one core (`gemm`: 1-thread float32 matrix "
                  "products; `python`: a plain Python loop), and quiet (`none`). The ratio in "
                  "brackets is against the flat head under the same load.", "",
                  contention_table(tables["contention"])]
    return "\n".join(lines) + "\n"


def _linear_ce_lines(rows: Sequence[Row]) -> list[str]:
    """The chunked ``linear_cross_entropy`` beside the plain flat step, per class count."""
    out = ["| classes | batch | flat step (ms) | linear_ce step (ms) | flat peak (MB) | "
           "linear_ce peak (MB) | hierarchical step (ms) | hierarchical peak (MB) |",
           "|" + "---|" * 8]
    seen = set()
    for r in sorted(rows, key=lambda r: (int(r["classes"]), int(r["batch"]))):
        if r["task"] != "train" or r["method"] != "linear_ce" or (r["classes"], r["batch"]) in seen:
            continue
        seen.add((r["classes"], r["batch"]))
        flat, ours = (reference(rows, r, m) for m in ("flat", "hsoftmax"))
        cells = [f"{int(r['classes']):,}", r["batch"]]
        for col in ("time_ms", "peak_mb"):
            for x in (flat, r):
                why = x.get("skip_reason", "").split(":")[0]
                cells.append(_fmt(_f(x.get(col))) or (f"skipped: {why}" if why else ""))
        cells += [_fmt(_f(ours.get("time_ms"))), _fmt(_f(ours.get("peak_mb")))]
        out.append("| " + " | ".join(cells) + " |")
    return out if seen else []


# --------------------------------------------------------------------------- the README table


@dataclass(frozen=True)
class Headline:
    """A row of the README's table: ``method`` against ``versus`` (flat by default)."""

    what: str
    suite: str
    task: str
    method: str
    variant: str = "adamw_fused"
    versus: str = "flat"
    column: str = "time_ms"  # or peak_mb
    classes: int | None = None  # None: the suite's main head
    contention: str = "none"
    threads: str | None = None


HEADLINES = (
    Headline("train step, fused AdamW", "train", "train", "hsoftmax"),
    Headline("train step, `sparse=True` + `SparseRowAdamW` (flat: fused AdamW)", "train",
             "train", "hsoftmax_sparse", "sparse"),
    Headline("train step, reference path forced (`HSOFTMAX_REFERENCE=1`)", "train", "train",
             "hsoftmax_reference"),
    Headline("train step against flat with chunked `F.linear_cross_entropy`", "train", "train",
             "hsoftmax", versus="linear_ce"),
    Headline("peak training memory, fused AdamW", "train", "train", "hsoftmax",
             column="peak_mb"),
    Headline("peak training memory against flat with `F.linear_cross_entropy`", "train",
             "train", "hsoftmax", versus="linear_ce", column="peak_mb"),
    Headline("exact log-probabilities of all classes", "inference", "log_probs", "hsoftmax", ""),
    Headline("exact top-5, untrained head", "inference", "topk5", "hsoftmax", ""),
    Headline("exact top-5, head trained on structured data", "inference", "topk5_trained",
             "hsoftmax", ""),
    Headline("train step beside a 1-thread GEMM process", "contention", "train", "hsoftmax",
             contention="gemm", threads="2"),
    Headline("the same, hierarchical head on 1 thread", "contention", "train", "hsoftmax",
             contention="gemm", threads="1"),
    Headline("`sparse=True` train step, 1,000,000 classes", "scaling", "train",
             "hsoftmax_sparse", "sparse", classes=1_000_000),
    Headline("`sparse=True` peak training memory, 10,000,000 classes", "scaling", "train",
             "hsoftmax_sparse", "sparse", column="peak_mb", classes=10_000_000),
)


def headline(tables: dict[str, list[Row]]) -> str:
    """The README's table of the main results, from one device's CSVs."""
    unit = {"time_ms": " ms", "peak_mb": " MB"}
    lines = ["| | hierarchical | flat baseline | vs flat | vs gather+bmm |",
             "|---|---|---|---|---|"]
    for h in HEADLINES:
        rows = tables.get(h.suite, [])
        classes = h.classes or min((int(r["classes"]) for r in rows), default=None)
        if h.suite == "scaling" and h.classes is None:
            classes = None
        ours = _pick(rows, h.task, h.method, h.variant, h.contention, classes, h.threads)
        ref = reference(rows, ours, h.versus) if ours else {}
        if ours and h.versus != "flat":
            ref = _pick(rows, h.task, h.versus, "adamw_fused", h.contention, classes)
        shown = [_fmt(_f(x.get(h.column)), unit[h.column]) or x.get("skip_reason")
                 or "not measured" for x in (ours, ref)]
        base = {"flat": "`Linear(1792, C)`", "linear_ce": "`F.linear_cross_entropy`"}[h.versus]
        x = ratio(ref, ours, h.column)
        gb = ratio(reference(rows, ours, "gather_bmm"), ours) if (
            ours and h.column == "time_ms" and h.versus == "flat") else None
        lines.append(f"| {h.what} | {shown[0]} | {base}: {shown[1]} | "
                     f"{f'{x:.1f}x' if x else ''} | {f'{gb:.2f}x' if gb else ''} |")
    return "\n".join(lines) + "\n"


def update_readme(readme: Path, text: str) -> bool:
    """Replace the README's text between the headline markers; whether it changed."""
    old = readme.read_text()
    if README_START not in old or README_END not in old:
        return False
    head, rest = old.split(README_START, 1)
    new = f"{head}{README_START}\n{text}{README_END}{rest.split(README_END, 1)[1]}"
    readme.write_text(new)
    return new != old


def load_tables(results: Path, suffix: str = "cpu") -> dict[str, list[Row]]:
    """The CSVs of one device and preset (``cpu``, ``cuda``, ``cpu_tiny``, ...) by suite."""
    return {s: read_csv(p) for s in SUITES if (p := results / f"{s}_{suffix}.csv").exists()}


def main(argv: Sequence[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=HERE / "results")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--readme", default=str(HERE.parent / "README.md"),
                   help="README whose headline table is rewritten from the CPU CSVs ('' skips)")
    a = p.parse_args(argv)
    written: list[Path] = []
    groups: dict[str, dict[str, list[Row]]] = {}
    for path in sorted(a.results.glob("*.csv")):
        m = STEM.match(path.stem)
        rows = read_csv(path) if m else []
        if not m or not rows:
            continue
        groups.setdefault(m.group(2) + (m.group(3) or ""), {})[m.group(1)] = rows
        md = path.with_suffix(".md")
        md.write_text(markdown(path.stem, rows))
        written.append(md)
        if not a.no_plots:
            written += plots(m.group(1), rows, path.with_suffix(""))
    for suffix, tables in groups.items():
        out = a.results / f"summary_{suffix}.md"
        out.write_text(summary(tables, suffix))
        written.append(out)
    if a.readme and "cpu" in groups and update_readme(Path(a.readme), headline(groups["cpu"])):
        written.append(Path(a.readme))
    for w in written:
        print(f"wrote {w}", file=sys.stderr)
    return written


__all__ = ["headline", "load_tables", "main", "quantile", "summary"]


if __name__ == "__main__":
    main(sys.argv[1:])
