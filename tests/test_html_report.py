"""``run --html``: the page renders in a real headless browser (Debian's Chromium,
installed by ``.ci/run``) with every failing case listed and each failing model
case's error plot visible (non-zero rendered size)."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess

import pytest
from click.testing import CliRunner

from conformance.cli import cli
from conformance.html_report import family, render_html
from conformance.runner import CaseResult, Status

BROKEN = "broken_backends:sliding_window_plus_one"  # fails exactly the qwen3 sliding-window case
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if path is None:
        if os.environ.get("LLM_REQUIRE_BROWSER") == "1":
            pytest.fail("LLM_REQUIRE_BROWSER=1 but no chromium on PATH (.ci/run installs Debian's chromium)")
        pytest.skip("no chromium on PATH (.ci/run installs it)")
    return path


def browse(page, tmp_path, *args) -> subprocess.CompletedProcess:
    command = [chromium(), *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args, page.as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def page(golden_dir, tmp_path_factory):
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("html")
    result = CliRunner().invoke(cli, ["run", "--backend", BROKEN, "--case", "qwen3/*", "--golden-dir", str(golden_dir),
                                      "--html", str(out / "report.html"), "--report", str(out / "report.json")])
    assert result.exit_code == 1, result.output
    failing = [e["case_id"] for e in json.loads((out / "report.json").read_text())["results"] if e["status"] == "failed"]
    assert failing == ["qwen3/sliding-window"]
    return out / "report.html", failing


def test_page_renders_with_plots_and_every_failure(page, tmp_path):
    path, failing = page
    dom = browse(path, tmp_path, "--virtual-time-budget=5000", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    match = re.search(r'data-rendered="([^"]*)"', dom.stdout)
    assert match, "the load handler did not run"
    sizes = json.loads(html.unescape(match.group(1)))
    assert set(sizes) == set(failing)
    for case, (natural_w, natural_h, shown_w, shown_h) in sizes.items():
        assert natural_w > 100 and natural_h > 100 and shown_w > 100 and shown_h > 100, (case, sizes[case])
    rows = re.findall(r'<tr class="case" data-status="([^"]+)"><td>([^<]+)</td>', dom.stdout)
    assert {case for status, case in rows if status == "failed"} == set(failing)
    assert len(rows) == 11 and rows[0][0] == "failed"  # failures first
    shot = tmp_path / "report.png"
    taken = browse(path, tmp_path, "--window-size=1200,2400", f"--screenshot={shot}")
    assert taken.returncode == 0 and shot.stat().st_size > 10_000


def _result(case_id, status, **kw):
    return CaseResult(case_id=case_id, dtype="float32", status=status, **kw)


def test_page_lists_errors_and_marks_partial_runs_without_a_browser():
    results = [_result("op/rms_norm/plain", Status.ERROR, message="RuntimeError: <boom> & more"),
               _result("qwen3/a", Status.PASSED), _result("gemma3/b", Status.NOT_IMPLEMENTED, message="no")]
    meta = {"backend": "x", "backend_spec": "x", "dtype": "float32", "corpus_version": "9", "golden_dir": "/g"}
    text = render_html(results, meta, partial=True)
    assert 'id="partial"' in text and "RuntimeError: &lt;boom&gt; &amp; more" in text
    assert "llm-conformance run --backend x --dtype float32 --golden-dir /g --case op/rms_norm/plain" in text
    assert text.index("op/rms_norm/plain") < text.index("qwen3/a")
    assert "No failing model case." in text
    assert family("op/rms_norm/plain") == "op/rms_norm" and family("qwen3/a") == "qwen3"


def test_exact_zeros_are_drawn_below_the_bound_not_above_it():
    from conformance.compare import Comparison
    from conformance.html_report import plot_points
    from conformance.tolerances import Tolerance

    def comparison(rel):
        return Comparison((1, 2, 3), (1, 2, 3), rel, (0, 0, 0), rel, 1.0, 0)

    result = _result("qwen3/x", Status.FAILED, tolerance=Tolerance(rel_rms=2e-5, max_abs_rel=2e-4, argmax_margin=1e-3),
                     comparisons={"embed": comparison(0.0), "layers.0": comparison(0.15), "logits": comparison(0.3)})
    names, values, shown, floor, top = plot_points(result)
    assert names == ["embed", "layers.0", "logits"]
    assert shown[0] == floor < 2e-5 / 10  # the untouched embedding sits far below the bound line
    assert shown[1:] == [0.15, 0.3] and top > 0.3


def _scenario_failure():
    from conformance.compare import Comparison
    from conformance.tolerances import Tolerance

    def comparison(rel):
        return Comparison((12, 128), (12, 128), rel, (0, 0), rel, 1.0, 0)

    rels = [1e-8, 2e-8, 1e-8, 3e-2, 4e-2, 5e-2]
    return _result("scenario/qwen3/speculative", Status.FAILED,
                   tolerance=Tolerance(rel_rms=2e-5, max_abs_rel=2e-4, argmax_margin=1e-3),
                   first_divergence="steps.3 (decode 4 after 13 tokens)",
                   comparisons={f"steps.{i}": comparison(r) for i, r in enumerate(rels)},
                   steps={f"steps.{i}": "decode 1 after 6 tokens" for i in range(6)})


def test_a_scenarios_plot_is_per_step_and_its_legend_leaves_the_curve_uncovered():
    pytest.importorskip("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from conformance.html_report import error_plot_figure

    result = _scenario_failure()
    meta = {"backend": "x", "backend_spec": "x", "dtype": "float32", "corpus_version": "9", "golden_dir": "/g"}
    text = render_html([result], meta)
    assert 'alt="error per step of scenario/qwen3/speculative"' in text and "error per layer" not in text
    for case in (result, _result("qwen3/x", Status.FAILED, tolerance=result.tolerance,
                                 comparisons={"embed": result.comparisons["steps.0"],
                                              "logits": result.comparisons["steps.5"]})):
        canvas = FigureCanvasAgg(error_plot_figure(case))
        canvas.draw()
        renderer, fig = canvas.get_renderer(), canvas.figure
        ax = fig.axes[0]
        legend, axes_box = ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)
        assert legend.x0 >= axes_box.x1, (legend, axes_box)   # right of the plotting area, not on it
