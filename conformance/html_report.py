"""``llm-conformance run --html FILE.html``: one self-contained page per run.

The page holds, with no external resource (no script, style sheet or image is
fetched; plots are PNG data URIs):

* the run's metadata (backend, options, dtype, corpus version, package versions,
  start and end times; "partial" when the run was interrupted);
* the summary line and a support matrix: for each case family (``qwen3``,
  ``op/rms_norm``, ...) how many cases passed, failed, errored, were not
  implemented, skipped or xfailed;
* one table of every case, failures first, with the error model of its first failing tensor,
  else its headline tensor (the backend's rel RMS error, the reference's own error in the run dtype, their ratio and
  the bound), the max abs error, the first diverging tensor, the message and the one-line
  repro command;
* for each failing model case, a plot (matplotlib, Agg) of the relative RMS error
  of every compared tensor in forward order (embed, layers.0, ..., norm, logits)
  against its bound, with the reference's own error in the run dtype drawn beside it
  (the bound of the error model is k times it plus a floor, so it varies per tensor), the
  first diverging tensor marked, so the layer where the backend leaves the reference is
  seen at a glance; for each failing scenario case, the same plot over its steps
  (``steps.0``, ``steps.1``, ...: the error of each call's logits), the first failing step
  marked.

A short inline script records, once the page has loaded, the rendered width and
height of every plot in the ``data-rendered`` attribute of ``<body>``; the browser
test (``tests/test_html_report.py``) reads it from Chromium's DOM dump. The page
reads fine without it.

matplotlib is needed for the plots only (``pip install "llm-refimpl[report]"``);
without it the page says so in place of each plot.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections import Counter
from pathlib import Path

from .errors import ConformanceError
from .report import _ROW_ORDER, REPRO, error_model_cells, judged_name, repro_command, summary_line
from .runner import CaseResult, Status, tap_order

_STATUS_CLASS = {status: status.value.replace(" ", "-") for status in Status}

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.passed { color: #17702a; }
.failed, .error, .xpassed, .nan, .crashed, .timed-out { color: #b00020; font-weight: bold; }
.not-implemented, .skipped { color: #777; } .xfailed { color: #a06000; }
code { font-size: 0.85em; word-break: break-all; }
.plot { margin: 1em 0 2em 0; } .plot img { max-width: 100%; border: 1px solid #ddd; }
.partial { background: #fff3cd; padding: 0.5em; border: 1px solid #e0c060; }
"""

_RENDER_CHECK = """
window.addEventListener("load", function () {
  var sizes = {};
  document.querySelectorAll("img.error-plot").forEach(function (img) {
    var box = img.getBoundingClientRect();
    sizes[img.dataset.case] = [img.naturalWidth, img.naturalHeight, Math.round(box.width), Math.round(box.height)];
  });
  document.body.setAttribute("data-rendered", JSON.stringify(sizes));
});
"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def family(case_id: str) -> str:
    """The case family of an id: ``qwen3/tied`` -> ``qwen3``, ``op/rms_norm/plain`` -> ``op/rms_norm``."""
    parts = case_id.split("/")
    return "/".join(parts[:2]) if parts[0] == "op" and len(parts) > 2 else parts[0]


def plot_bounds(result: CaseResult, names: list[str]) -> tuple[list, list]:
    """``(bounds, references)``: each tensor's rel RMS bound and the reference's own rel RMS error
    in the run dtype (None where there is none: float64, ulp and exact rules, not recorded).
    Without judgements (an old result) every bound is the tolerance row's ``rel_rms``."""
    bounds, references = [], []
    for name in names:
        judgement = result.judgements.get(name)
        if judgement is None:
            bounds.append(result.tolerance.rel_rms if result.tolerance is not None else None)
            references.append(None)
        else:
            bounds.append(judgement.bound_rel_rms)
            references.append(judgement.reference_rel_rms)
    return bounds, references


def plot_points(result: CaseResult):
    """``(names, values, shown, floor, top)`` of :func:`error_plot_png`: the tensors in forward
    order, their relative RMS errors (inf for NaN/Inf), and the y values drawn (exact zeros
    on ``floor``, below the bounds, the reference's errors and every nonzero error; non-finite
    ones at ``top``)."""
    names = [n for n in tap_order(set(result.comparisons) - {"logits"})] + (
        ["logits"] if "logits" in result.comparisons else [])
    values = []
    for name in names:
        c = result.comparisons[name]
        value = c.rel_rms if not c.nonfinite and math.isfinite(c.rel_rms) else math.inf
        values.append(value)
    finite = [v for v in values if math.isfinite(v) and v > 0]
    bounds, references = plot_bounds(result, names)
    others = [v for v in bounds + references if v is not None and math.isfinite(v) and v > 0]
    # Exact zeros (an untouched embedding, say) sit on a floor well below the bounds, the
    # reference's errors and every nonzero error, drawn with their own marker, so they never
    # look like a divergence.
    floor = min(finite + others) / 100 if (finite or others) else 1e-17
    top = max(finite + others) * 10 if (finite or others) else 1.0
    shown = [max(v, floor) if math.isfinite(v) else top for v in values]
    return names, values, shown, floor, top


def is_scenario(result: CaseResult) -> bool:
    """True when the compared tensors are a scenario's steps (``steps.{i}``), not a model's taps."""
    return bool(result.comparisons) and all(name.startswith("steps.") for name in result.comparisons)


def error_plot_png(result: CaseResult) -> bytes:
    """PNG of the relative RMS error per compared tensor of a model case (in forward order), or
    per step of a scenario.

    Raises:
        ImportError: matplotlib is not installed.
    """
    buffer = io.BytesIO()
    # "tight" keeps the legend, drawn right of the axes, inside the image.
    error_plot_figure(result).savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


def error_plot_figure(result: CaseResult):
    """The matplotlib ``Figure`` (Agg) of :func:`error_plot_png`; its legend sits right of the
    axes, so that it never covers the curve.

    Raises:
        ImportError: matplotlib is not installed.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    names, values, shown, floor, top = plot_points(result)
    bounds, references = plot_bounds(result, names)
    fig = Figure(figsize=(max(6.0, 0.35 * len(names) + 2), 3.6), dpi=100)
    ax = fig.add_subplot()
    ax.plot(range(len(names)), shown, marker="o", color="#1f5fa8", label="relative RMS error")
    drawn = [(i, max(r, floor)) for i, r in enumerate(references) if r is not None]
    if drawn:
        ax.plot([i for i, _ in drawn], [r for _, r in drawn], marker=".", linestyle=":", color="#555555",
                label=f"reference's own error ({result.dtype})")
    zeros = [i for i, v in enumerate(values) if v == 0]
    if zeros:
        ax.plot(zeros, [floor] * len(zeros), linestyle="none", marker="v", color="#17702a", markersize=8,
                label="exactly 0 (drawn at the floor)")
    for i, v in enumerate(values):
        if not math.isfinite(v):
            ax.plot([i], [top], marker="X", color="#b00020", markersize=10)
    steps = [(i, b) for i, b in enumerate(bounds) if b is not None and math.isfinite(b)]
    if len({b for _, b in steps}) == 1:
        ax.axhline(steps[0][1], color="#b00020", linestyle="--", label=f"bound {steps[0][1]:.0e} ({result.dtype})")
    elif steps:
        ax.plot([i for i, _ in steps], [b for _, b in steps], drawstyle="steps-mid", color="#b00020",
                linestyle="--", label=f"bound per tensor ({result.dtype})")
    # A scenario's first divergence reads "steps.3 (decode 1 after 12 tokens)".
    first = (result.first_divergence or "").split(" ")[0]
    if first in names:
        i = names.index(first)
        ax.axvline(i, color="#a06000", linestyle=":", label=f"first divergence: {result.first_divergence}")
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("rel RMS vs expected")
    ax.set_xlabel("step (schedule index)" if is_scenario(result) else "tensor, in forward order", fontsize=8)
    ax.set_title(f"{result.case_id} ({result.dtype})", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    # No tight_layout: it would shrink the axes to make room for the legend; the PNG is saved with
    # bbox_inches="tight", which widens the image instead.
    return fig


def _plot_html(result: CaseResult) -> str:
    try:
        png = error_plot_png(result)
    except ImportError:
        return (f'<p class="plot">No plot for {_e(result.case_id)}: matplotlib is not installed '
                f'(pip install "llm-refimpl[report]").</p>')
    data = base64.b64encode(png).decode("ascii")
    per = "step" if is_scenario(result) else "layer"
    return (f'<div class="plot" id="plot-{_e(result.case_id)}"><h3>{_e(result.case_id)}</h3>'
            f'<img class="error-plot" data-case="{_e(result.case_id)}" alt="error per {per} of {_e(result.case_id)}" '
            f'src="data:image/png;base64,{data}"></div>')


def _matrix_html(results: list[CaseResult]) -> str:
    statuses = [s for s in Status if any(r.status is s for r in results)]
    counts: dict[str, Counter] = {}
    for r in results:
        counts.setdefault(family(r.case_id), Counter())[r.status] += 1
    head = "".join(f"<th>{_e(s.value)}</th>" for s in statuses)
    rows = []
    for name, count in counts.items():
        cells = "".join(f'<td class="num {_STATUS_CLASS[s]}">{count[s] or ""}</td>' for s in statuses)
        rows.append(f"<tr><td>{_e(name)}</td>{cells}</tr>")
    return f'<table id="matrix"><tr><th>case family</th>{head}</tr>{"".join(rows)}</table>'


def _cases_html(results: list[CaseResult], meta: dict) -> str:
    rows = []
    for r in sorted(results, key=lambda r: _ROW_ORDER.index(r.status)):
        name = judged_name(r)
        c = None if name is None else r.comparisons[name]
        rel = "" if c is None else (f"{c.nonfinite} NaN/Inf" if c.nonfinite else f"{c.rel_rms:.2e}")
        mx = "" if c is None else f"{c.max_abs:.2e}"
        model = "".join(f'<td class="num">{_e(cell)}</td>' for cell in error_model_cells(r))
        repro = (f"<br><code>repro: {_e(repro_command(meta, r.case_id))}</code>"
                 if r.status in REPRO else "")
        message = r.message if r.status not in (Status.XFAILED, Status.XPASSED) else \
            f"xfail ({r.expectation}): {r.message}"
        rows.append(
            f'<tr class="case" data-status="{_e(r.status.value)}"><td>{_e(r.case_id)}</td>'
            f'<td class="{_STATUS_CLASS[r.status]}">{_e(r.status.value)}</td><td class="num">{rel}</td>{model}'
            f'<td class="num">{mx}</td><td>{_e(r.first_divergence or "")}</td><td>{_e(message)}{repro}</td></tr>')
    head = ("<tr><th>case</th><th>status</th><th>rel RMS</th><th>ref rel RMS</th><th>ratio</th><th>bound</th>"
            "<th>max abs</th><th>first divergence</th><th>message</th></tr>")
    return f'<table id="cases">{head}{"".join(rows)}</table>'


def render_html(results: list[CaseResult], meta: dict, partial: bool = False) -> str:
    """The page as a string (see the module docstring)."""
    title = f"llm-conformance: {meta.get('backend', '?')} on corpus {meta.get('corpus_version', '?')} ({meta.get('dtype', '?')})"
    info = {k: meta.get(k) for k in ("backend", "backend_spec", "backend_options", "outputs_dir", "dtype",
                                       "corpus_version", "conformance_version", "golden_dir", "started_at",
                                       "finished_at", "package_versions") if meta.get(k) not in (None, "", {})}
    info_rows = "".join(f"<tr><th>{_e(k)}</th><td><code>{_e(v if isinstance(v, str) else json.dumps(v))}</code></td></tr>"
                        for k, v in info.items())
    failing_models = [r for r in results if r.status in (Status.FAILED, Status.NAN, Status.XFAILED)
                      and r.comparisons and len(r.comparisons) > 1
                      and ("logits" in r.comparisons or is_scenario(r))]
    plots = "".join(_plot_html(r) for r in failing_models) or "<p>No failing model case.</p>"
    banner = ('<p class="partial" id="partial">Partial results: the run was interrupted; '
              'cases after the last one listed did not run.</p>' if partial else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title><style>{_CSS}</style></head>
<body>
<h1>{_e(title)}</h1>
{banner}
<p id="summary"><strong>{_e(summary_line(results))}</strong></p>
<table id="meta">{info_rows}</table>
<h2>Support matrix</h2>
{_matrix_html(results)}
<h2>Cases (failures first)</h2>
{_cases_html(results, meta)}
<h2>Error per layer of failing model cases, per step of failing scenarios</h2>
{plots}
<script>{_RENDER_CHECK}</script>
</body></html>
"""


def write_html_report(path, results: list[CaseResult], meta: dict, partial: bool = False) -> None:
    """Write :func:`render_html` to ``path``.

    Raises:
        ConformanceError: the file cannot be written.
    """
    try:
        Path(path).write_text(render_html(results, meta, partial), encoding="utf-8")
    except OSError as exc:
        raise ConformanceError(f"cannot write HTML report {path} ({exc})") from None
