"""Turn the benchmark CSVs into markdown tables and PNG plots (nothing here is typed by hand).

For every ``<script>_<device>[_<preset>].csv`` in the results folder this writes
``<same stem>.md`` (one table per question, with the environment the rows came from) and
``<same stem>.png``; when the train, inference, memory and scaling CSVs of one device and preset
are all there, also ``summary_<device>[_<preset>].md``: the issue's targets against the measured
ratios.

    python benchmarks/report.py                       # benchmarks/results
    python benchmarks/report.py --results benchmarks/results/tmp
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import read_csv  # noqa: E402

Row = dict[str, str]
STEM = re.compile(r"^(train|inference|memory|scaling)_(cpu|cuda)(_\w+)?$")
METHOD_ORDER = ("flat", "flat_bottleneck", "adaptive", "gather_bmm", "hsoftmax", "hsoftmax_sparse")
COLORS = {
    "flat": "#7f7f7f",
    "flat_bottleneck": "#bcbd22",
    "adaptive": "#17becf",
    "gather_bmm": "#ff7f0e",
    "hsoftmax": "#1f77b4",
    "hsoftmax_sparse": "#2ca02c",
}
QUESTION_TITLES = {
    "train": "training step (forward + backward + optimizer)",
    "log_probs": "exact log-probabilities of all classes",
    "topk5": "exact top-5",
    "topk5_trained": "exact top-5, head trained on structured data",
    "predict": "predict (argmax; top-1 routing for two-level heads)",
    "memory_train": "peak training memory (3 steps, fresh process)",
    "sparse_train": "big heads: training memory and step time",
    "params": "parameters",
}


def _f(v: str) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def _fmt(v: str, digits: int = 3) -> str:
    x = _f(v)
    if x is None:
        return ""
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def _order(rows: Sequence[Row]) -> list[Row]:
    def key(r: Row) -> tuple[int, int, str]:
        m = METHOD_ORDER.index(r["method"]) if r["method"] in METHOD_ORDER else 99
        return (int(r["classes"]), m, r["variant"])

    return sorted(rows, key=key)


def _environment(rows: Sequence[Row]) -> str:
    r = rows[0]
    shared = any(x.get("shared_machine") == "True" for x in rows)
    dates = sorted({x["date"] for x in rows if x.get("date")})
    span = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}" if dates else "?"
    lines = [
        f"- device: {r['device']} ({r['device_name']}), {r['threads']} threads, {r['dtype']}",
        f"- torch {r['torch']}, hsoftmax {r['hsoftmax']} (commit {r['commit'] or '?'}), {span}",
        f"- isolation: {r['isolation']} (see benchmarks/README.md), rounds per row: "
        f"{max((x['rounds'] for x in rows if x['rounds']), default='-')}",
    ]
    loads = [float(x["load1"]) for x in rows if _f(x.get("load1", ""))]
    if loads and r["device"] == "cpu":
        lines.append(f"- 1-minute load average at task starts: {min(loads):.1f} to "
                     f"{max(loads):.1f} (the machine has {r['device_name'].split('(')[-1]}")
    bandwidths = [float(x["copy_gbs"]) for x in rows if _f(x.get("copy_gbs", ""))]
    if bandwidths:
        lines.append(f"- memory copy bandwidth after the tasks (128 MB, best of 10, lowest over "
                     f"rounds): {min(bandwidths):.0f} to {max(bandwidths):.0f} GB/s")
    if shared:
        lines.append("- taken on a shared machine: other jobs were running; treat absolute "
                     "times with care, ratios are from the same interleaved rounds")
    return "\n".join(lines)


def table(rows: Sequence[Row], question: str) -> str:
    """A markdown table of one question's rows."""
    memory = question in ("memory_train", "sparse_train")
    head = ["method", "variant", "classes", "params (M)"]
    if question != "params":
        head += ["time (ms)", "IQR (ms)", "runs"]
    if memory:
        head += ["peak RSS (MB)", "peak RSS, warm baseline (MB)", "peak CUDA (MB)",
                 "estimate (MB)"]
    head += ["vs flat", "vs gather_bmm"]
    if question not in ("params",) and not memory:
        head += ["peak RSS (MB)", "verified"]
    head += ["note"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in _order(rows):
        params = _f(r["params"])
        cells = [f"`{r['method']}`", r["variant"], f"{int(r['classes']):,}",
                 f"{params / 1e6:.2f}" if params else ""]
        if question != "params":
            cells += [_fmt(r["time_ms"]), _fmt(r["iqr_ms"], 2), r["runs"]]
        if memory:
            cells += [_fmt(r["peak_rss_mb"]), _fmt(r.get("peak_rss_warm_mb", "")),
                      _fmt(r["peak_cuda_mb"]), _fmt(r["est_mb"])]
        for col in ("ratio_vs_flat", "ratio_vs_gather_bmm"):
            x = _f(r[col])
            cells.append(f"{x:.2f}x" if x is not None else "")
        if question not in ("params",) and not memory:
            cells += [_fmt(r["peak_rss_mb"]), r["verified"]]
        note = f"**skipped**: {r['skip_reason']}" if r["skip_reason"] else r["note"]
        cells.append(note.replace("|", "\\|"))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def markdown(stem: str, rows: Sequence[Row]) -> str:
    parts = [f"# Benchmark results: {stem}", "",
             f"Generated by `benchmarks/report.py` from `{stem}.csv`.", "",
             _environment(rows), ""]
    parts.append("Ratios: the reference's value divided by this row's (time, or peak memory, or "
                 "parameters); above 1 means cheaper than the reference. Sparse training rows "
                 "compare against the flat head's fused-AdamW step.")
    for q in dict.fromkeys(r["question"] for r in rows):
        qrows = [r for r in rows if r["question"] == q]
        parts += ["", f"## {q}: {QUESTION_TITLES.get(q, q)}", "", table(qrows, q)]
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------- plots


def _plot(stem: str, kind: str, rows: Sequence[Row], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if kind == "scaling":
        questions = [q for q in ("train", "topk5") if any(r["question"] == q for r in rows)]
        fig, axes = plt.subplots(1, len(questions), figsize=(6 * len(questions), 4.5),
                                 squeeze=False)
        for ax, q in zip(axes[0], questions):
            for method in METHOD_ORDER:
                pts = sorted(
                    (int(r["classes"]), float(r["time_ms"]))
                    for r in rows
                    if r["question"] == q and r["method"] == method and _f(r["time_ms"])
                )
                if pts:
                    xs, ys = [c for c, _ in pts], [t for _, t in pts]
                    ax.plot(xs, ys, marker="o", label=method, color=COLORS[method])
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("number of classes")
            ax.set_ylabel("time per call (ms)")
            ax.set_title(QUESTION_TITLES.get(q, q), fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
        axes[0][0].legend(fontsize=8)
    else:
        metric_of = {"memory_train": "peak_rss_mb"}
        questions = [q for q in dict.fromkeys(r["question"] for r in rows)
                     if q in ("train", "log_probs", "topk5", "predict", "memory_train")]
        if not questions:
            return None
        fig, axes = plt.subplots(1, len(questions), figsize=(5 * len(questions), 4),
                                 squeeze=False)
        for ax, q in zip(axes[0], questions):
            metric = metric_of.get(q, "time_ms")
            if q == "memory_train" and any(_f(r["peak_cuda_mb"]) for r in rows):
                metric = "peak_cuda_mb"
            qrows = [r for r in _order([r for r in rows if r["question"] == q])
                     if _f(r[metric])]
            if not qrows:
                ax.set_axis_off()
                ax.set_title(f"{QUESTION_TITLES.get(q, q)}: no values", fontsize=9)
                continue
            labels = [r["method"] + ("" if r["variant"] in ("adamw_fused", q) else
                                     f" ({r['variant']})") for r in qrows]
            values = [float(r[metric]) for r in qrows]
            ax.barh(range(len(values)), values,
                    color=[COLORS.get(r["method"], "k") for r in qrows])
            ax.set_yticks(range(len(values)), labels, fontsize=8)
            ax.invert_yaxis()
            ax.set_xscale("log")
            ax.set_xlabel("peak RSS (MB)" if metric != "time_ms" else "time (ms), log scale")
            ax.set_title(QUESTION_TITLES.get(q, q), fontsize=9)
            for i, v in enumerate(values):
                ax.text(v, i, f" {_fmt(str(v))}", va="center", fontsize=7)
            ax.grid(True, axis="x", which="both", alpha=0.3)
    r0 = rows[0]
    fig.suptitle(f"{stem}: {r0['device_name']}, {r0['threads']} threads, torch {r0['torch']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    what: str
    csv: str  # script name
    question: str
    method: str
    variant: str
    column: str  # ratio column, or time_ms / peak_rss_mb for absolute targets
    bound: float
    at_least: bool  # True: measured >= bound; False: measured <= bound
    classes: int | None = None  # None: the preset's main head

    def met(self, value: float) -> bool:
        return value >= self.bound if self.at_least else value <= self.bound


TARGETS = (
    Target("train step vs flat", "train", "train", "hsoftmax", "adamw_fused",
           "ratio_vs_flat", 60, True),
    Target("train step vs gather+bmm", "train", "train", "hsoftmax", "adamw_fused",
           "ratio_vs_gather_bmm", 1.5, True),
    Target("train step vs flat, grads kept (set_to_none=False) for both", "train", "train",
           "hsoftmax", "adamw_fused_keep", "ratio_vs_flat", 60, True),
    Target("train step vs gather+bmm, grads kept for both", "train", "train", "hsoftmax",
           "adamw_fused_keep", "ratio_vs_gather_bmm", 1.5, True),
    Target("exact top-5 vs flat", "inference", "topk5", "hsoftmax", "topk5",
           "ratio_vs_flat", 20, True),
    Target("exact top-5 vs flat, trained head (structured data)", "inference",
           "topk5_trained", "hsoftmax", "topk5", "ratio_vs_flat", 20, True),
    Target("exact log-probs vs flat", "inference", "log_probs", "hsoftmax", "log_probs",
           "ratio_vs_flat", 5, True),
    Target("peak training memory vs flat (less)", "memory", "memory_train", "hsoftmax",
           "adamw_fused", "ratio_vs_flat", 12, True),
    Target("peak training memory vs flat (less), warm baseline", "memory", "memory_train",
           "hsoftmax", "adamw_fused", "ratio:peak_rss_warm_mb", 12, True),
    Target("peak training memory vs flat (less)", "memory", "memory_train", "hsoftmax_sparse",
           "sparse", "ratio_vs_flat", 12, True),
    Target("peak training memory vs flat (less), warm baseline", "memory", "memory_train",
           "hsoftmax_sparse", "sparse", "ratio:peak_rss_warm_mb", 12, True),
    Target("sparse train step vs flat", "train", "train", "hsoftmax_sparse", "sparse",
           "ratio_vs_flat", 150, True),
    Target("sparse 1M classes step (ms)", "scaling", "train", "hsoftmax_sparse", "sparse",
           "time_ms", 60, False, 1_000_000),
    Target("sparse 10M classes peak memory (MB)", "memory", "sparse_train", "hsoftmax_sparse",
           "sparse", "peak_rss_mb", 24 * 1024, False, 10_000_000),
)


def _find(rows: Sequence[Row], method: str, variant: str, classes: int | None) -> Row:
    """The row of ``method``/``variant`` at ``classes``, or an empty one."""
    hit = [r for r in rows if r["method"] == method and r["variant"] == variant
           and int(r["classes"]) == classes]
    return hit[0] if hit else {}


def measured(t: Target, tables: dict[str, list[Row]]) -> tuple[Row, str, float | None]:
    """The row that ``t`` reads (empty when not measured), the column it reads (the GPU's
    memory on CUDA) and the value there (``None`` when missing, or not defined on CUDA)."""
    rows = tables.get(t.csv, [])
    classes = t.classes
    if classes is None:  # the preset's main head: the size the flat head ran at
        mains = [r for r in rows if r["question"] == t.question and r["method"] == "flat"]
        classes = int(mains[0]["classes"]) if mains else None
    r = _find([x for x in rows if x["question"] == t.question], t.method, t.variant, classes)
    column = t.column
    if r.get("device") == "cuda" and column == "peak_rss_mb":
        column = "peak_cuda_mb"
    if not r or (r["device"] == "cuda" and column.startswith("ratio:")):
        return r, column, None
    if not column.startswith("ratio:"):
        return r, column, _f(r.get(column, ""))
    col = column.split(":", 1)[1]  # a ratio against flat computed here
    flat = [f for f in rows if f["question"] == t.question and f["method"] == "flat"
            and f["classes"] == r["classes"]]
    a, b = (_f(flat[0].get(col, "")) if flat else None), _f(r.get(col, ""))
    return r, column, a / b if a and b else None


def summary(tables: dict[str, list[Row]], title: str) -> str:
    """The targets of issue 3 against the measured values."""
    first = next((rs[0] for rs in tables.values() if rs), None)
    where = (f"{first['device_name']}, {first['threads']} threads, torch {first['torch']}"
             if first else "?")
    lines = [f"# Targets: {title}", "",
             "Generated by `benchmarks/report.py` from the CSVs beside this file.", "",
             f"Measured on {where}. The targets of issue 3 are set for the CPU with 2 threads; "
             "on a GPU they are shown for information.", "",
             *([("**Shared machine**: other jobs were running during these measurements "
                 "(`shared_machine`, `load1` columns). Times, and ratios against a method "
                 "measured at a different load, are distorted; rerun on an idle machine "
                 "before quoting them."), ""]
               if any(r.get("shared_machine") == "True" for rs in tables.values() for r in rs)
               else []),
             "| target | method | measured | required | met | source |",
             "|---|---|---|---|---|---|"]
    for t in TARGETS:
        required = f"{'>=' if t.at_least else '<='} {t.bound:g}"
        if t.column.startswith("ratio"):
            required += "x"
        r, column, x = measured(t, tables)
        if not r:
            lines.append(f"| {t.what} | `{t.method}` | not measured | {required} | - | "
                         f"{t.csv} |")
            continue
        if r["device"] == "cuda" and column.startswith("ratio:"):
            lines.append(f"| {t.what} | `{t.method}` | n/a on CUDA | {required} | - | "
                         f"{t.csv} |")
            continue
        if x is None:
            why = r["skip_reason"] or "no value"
            lines.append(f"| {t.what} | `{t.method}` | {why} | {required} | no | {t.csv} |")
            continue
        shown = f"{x:.2f}x" if column.startswith("ratio") else _fmt(str(x))
        if column == "ratio_vs_flat" and r.get("ratio_vs_flat_range"):
            shown += f" (quartiles {r['ratio_vs_flat_range']}x)"
        if column == "peak_cuda_mb":
            shown += " (CUDA)"
        source = f"{t.csv}, {r['date'][:10]}, `{r['commit']}`"  # the code that was measured
        lines.append(f"| {t.what} ({int(r['classes']):,} classes) | `{t.method}` | {shown} | "
                     f"{required} | {'yes' if t.met(x) else '**no**'} | {source} |")
    if any(r.get("ratio_vs_flat_range") for rs in tables.values() for r in rs):
        lines += ["", "Quartiles: the flat head's first quartile over the method's third, to its "
                  "third over the method's first, from the same runs: where the ratio lands "
                  "within the timings' spread. A target inside that range is met only as far "
                  "as this machine's noise allows."]
    return "\n".join([*lines, *_cold_memory_cap(tables.get("memory", []))]) + "\n"


def _cold_memory_cap(rows: Sequence[Row]) -> list[str]:
    """Why the memory ratio against the cold baseline has a ceiling: the runtime pages that any
    step touches count against every method, on top of the unavoidable AdamW state."""
    train = [r for r in rows if r["question"] == "memory_train"]
    if not train:
        return []
    classes = int(train[0]["classes"])
    flat, head = (_find(train, method, "adamw_fused", classes) for method in ("flat", "hsoftmax"))
    found = [_f(r.get(c, "")) for r, c in ((flat, "peak_rss_mb"), (head, "params"),
                                           (flat, "idle_rss_mb"), (flat, "warm_idle_rss_mb"))]
    values = [v for v in found if v is not None]
    if len(values) < len(found):
        return []
    flat_peak, params, idle, warm_idle = values
    runtime = warm_idle - idle
    # float32: weight, gradient and two moments take 16 bytes a parameter, 12 without gradient
    state, lazy = params * 16 / 2**20, params * 12 / 2**20
    return ["", f"The cold baseline charges every method the {runtime:.0f} MB of runtime pages "
            f"that any training step touches (warm idle minus idle worker). With them, a head "
            f"of {params / 1e6:.2f}M parameters, whose weights, gradients and two AdamW "
            f"moments alone take {state:.0f} MB, can be at most {flat_peak:.0f} / "
            f"({state:.0f} + {runtime:.0f}) = {flat_peak / (state + runtime):.2f}x below flat "
            f"on that baseline, and {flat_peak:.0f} / ({lazy:.0f} + {runtime:.0f}) = "
            f"{flat_peak / (lazy + runtime):.2f}x with no gradient at all (`sparse=True` comes "
            f"close), whatever the implementation: the warm baseline is the one that measures "
            f"the head."]


@dataclass(frozen=True)
class Headline:
    """A row of the README's table: ``method``/``variant`` against ``flat``/``flat_variant``."""

    what: str
    csv: str
    question: str
    method: str
    variant: str
    flat_variant: str
    column: str = "time_ms"  # or peak_rss_warm_mb, peak_rss_mb
    classes: int | None = None  # None: the preset's main head


HEADLINES = (
    Headline("train step, fused AdamW, fresh gradients (`zero_grad()`)", "train", "train",
             "hsoftmax", "adamw_fused", "adamw_fused"),
    Headline("train step, fused AdamW, gradients kept (`zero_grad(set_to_none=False)`)",
             "train", "train", "hsoftmax", "adamw_fused_keep", "adamw_fused_keep"),
    Headline("train step, `sparse=True` + `SparseRowAdamW` (flat: fused AdamW)", "train",
             "train", "hsoftmax_sparse", "sparse", "adamw_fused"),
    Headline("exact log-probabilities of all classes", "inference", "log_probs", "hsoftmax",
             "log_probs", "log_probs"),
    Headline("exact top-5, untrained head (flat top: pruned by int8 bounds)", "inference",
             "topk5", "hsoftmax", "topk5", "topk5"),
    Headline("exact top-5, head trained 60 steps on structured data", "inference",
             "topk5_trained", "hsoftmax", "topk5", "topk5"),
    Headline("peak training RSS above a warm idle worker, fused AdamW", "memory",
             "memory_train", "hsoftmax", "adamw_fused", "adamw_fused", "peak_rss_warm_mb"),
    Headline("peak training RSS above a warm idle worker, `sparse=True`", "memory",
             "memory_train", "hsoftmax_sparse", "sparse", "adamw_fused", "peak_rss_warm_mb"),
    Headline("`sparse=True` train step, 1,000,000 classes", "scaling", "train",
             "hsoftmax_sparse", "sparse", "adamw_fused", classes=1_000_000),
    Headline("`sparse=True` peak training RSS, 10,000,000 classes", "memory", "sparse_train",
             "hsoftmax_sparse", "sparse", "adamw_fused", "peak_rss_mb", 10_000_000),
)
README_START, README_END = "<!-- headline:start -->", "<!-- headline:end -->"
TABLES = ("train", "inference", "memory", "scaling")  # the CSVs the headline reads


def headline(tables: dict[str, list[Row]]) -> str:
    """The README's table of the main results, from one device's CSVs."""
    unit = {"time_ms": " ms", "peak_rss_warm_mb": " MB", "peak_rss_mb": " MB"}
    lines = ["| | hierarchical | flat `Linear(1792, C)` | vs flat | vs gather+bmm |",
             "|---|---|---|---|---|"]
    for h in HEADLINES:
        rows = [r for r in tables.get(h.csv, []) if r["question"] == h.question]
        classes = h.classes or min((int(r["classes"]) for r in rows), default=None)
        ours = _find(rows, h.method, h.variant, classes)
        flat = _find(rows, "flat", h.flat_variant, classes)
        a, b = _f(ours.get(h.column, "")), _f(flat.get(h.column, ""))
        shown = [f"{_fmt(x.get(h.column, ''))}{unit[h.column]}" if v is not None
                 else (x.get("skip_reason") or "not measured")
                 for x, v in ((ours, a), (flat, b))]
        ratio = f"{b / a:.1f}x" if a and b else ""
        versus = _f(ours.get("ratio_vs_gather_bmm", "")) if h.column == "time_ms" else None
        lines.append(f"| {h.what} | {shown[0]} | {shown[1]} | {ratio} | "
                     f"{f'{versus:.2f}x' if versus else ''} |")
    return "\n".join(lines) + "\n"


def update_readme(readme: Path, text: str) -> bool:
    """Replace the README's text between the headline markers; whether it changed."""
    old = readme.read_text()
    head, rest = old.split(README_START, 1)
    new = f"{head}{README_START}\n{text}{README_END}{rest.split(README_END, 1)[1]}"
    readme.write_text(new)
    return new != old


def main(argv: Sequence[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=HERE / "results")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--readme", default=str(HERE.parent / "README.md"),
                   help="README whose headline table is rewritten from the CPU CSVs ('' skips)")
    a = p.parse_args(argv)
    written: list[Path] = []
    groups: dict[str, dict[str, list[Row]]] = {}
    for csv_file in sorted(a.results.glob("*.csv")):
        m = STEM.match(csv_file.stem)
        if not m:
            continue
        rows = read_csv(csv_file)
        if not rows:
            continue
        kind, device, preset = m.group(1), m.group(2), m.group(3) or ""
        groups.setdefault(f"{device}{preset}", {})[kind] = rows
        md = csv_file.with_suffix(".md")
        md.write_text(markdown(csv_file.stem, rows))
        written.append(md)
        if not a.no_plots:
            png = _plot(csv_file.stem, kind, rows, csv_file.with_suffix(".png"))
            if png:
                written.append(png)
    for suffix, tables in groups.items():
        if "train" in tables:
            path = a.results / f"summary_{suffix}.md"
            path.write_text(summary(tables, suffix))
            written.append(path)
    readme = Path(a.readme) if a.readme else None
    if readme and "cpu" in groups and update_readme(readme, headline(groups["cpu"])):
        written.append(readme)
    for w in written:
        print(f"wrote {w}", file=sys.stderr)
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
