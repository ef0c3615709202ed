"""Worker-process isolation: a backend that aborts the process on one case and
sleeps forever on another gets "crashed" and "timed out" for those two and the
run goes on; NaN outputs get their own status; Ctrl-C still writes the report,
marked partial."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from click.testing import CliRunner

from conformance.cli import cli

TESTS = Path(__file__).resolve().parent
CRASH, HANG = "qwen3/single-token", "qwen3/eps-sensitive"


def run(golden_dir, tmp_path, *args):
    report = tmp_path / "report.json"
    result = CliRunner().invoke(cli, ["run", "--golden-dir", str(golden_dir), "--report", str(report), *args])
    entries = {e["case_id"]: e for e in json.loads(report.read_text())["results"]} if report.exists() else {}
    return result, entries


def test_crash_and_hang_get_their_own_statuses_and_the_rest_pass(golden_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.syspath_prepend(str(TESTS))
    result, entries = run(golden_dir, tmp_path, "--backend", "odd_backends:crash_and_hang", "-o", f"crash={CRASH}",
                          "-o", f"hang={HANG}", "--case", "qwen3/*", "--timeout", "20")
    assert result.exit_code == 1, result.output
    assert entries[CRASH]["status"] == "crashed" and "SIGABRT" in entries[CRASH]["message"]
    assert entries[HANG]["status"] == "timed out" and "20 s" in entries[HANG]["message"]
    others = {k: v["status"] for k, v in entries.items() if k not in (CRASH, HANG)}
    assert len(others) == 9 and set(others.values()) == {"passed"}
    assert "1 crashed" in result.output and "1 timed out" in result.output


def test_nan_outputs_are_their_own_status(golden_dir, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    result, entries = run(golden_dir, tmp_path, "--backend", "odd_backends:nan_on", "-o", "case=qwen3/mha-batch3",
                          "--case", "qwen3/mha-batch3", "--case", "qwen3/tied*", "--no-isolate")
    assert result.exit_code == 1
    assert entries["qwen3/mha-batch3"]["status"] == "nan"
    assert "NaN" in entries["qwen3/mha-batch3"]["message"]
    assert entries["qwen3/tied-mqa-prime-len"]["status"] == "passed"


def test_ctrl_c_writes_a_partial_report(golden_dir, tmp_path):
    report, page, junit = tmp_path / "report.json", tmp_path / "report.html", tmp_path / "report.xml"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    # Three cases run, then the fourth hangs; Ctrl-C arrives while it hangs.
    order = ["qwen3/tied-mqa-prime-len", "qwen3/untied-gqa-odd-len", "qwen3/mha-batch3", HANG]
    command = [sys.executable, "-m", "conformance", "run", "--backend", "odd_backends:crash_and_hang",
               "-o", f"hang={HANG}", "--golden-dir", str(golden_dir), "--report", str(report), "--html", str(page),
               "--junit", str(junit),
               "--timeout", "300", *[a for case in order for a in ("--case", case)]]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    deadline = time.monotonic() + 180
    seen = ""
    while HANG not in seen and time.monotonic() < deadline:
        line = process.stderr.readline()
        seen += line
        if not line and process.poll() is not None:
            break
    assert HANG in seen, seen
    time.sleep(3)
    os.killpg(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr[-2000:]
    data = json.loads(report.read_text())
    assert data["meta"]["partial"] is True
    done = {e["case_id"]: e["status"] for e in data["results"]}
    assert done == {case: "passed" for case in order[:3]}
    assert "partial" in stderr.lower() and 'id="partial"' in page.read_text()
    xml = junit.read_text()
    assert 'name="run interrupted"' in xml and 'type="interrupted"' in xml and 'errors="1"' in xml


def test_a_hung_or_crashed_scenario_names_the_step_in_progress(golden_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.syspath_prepend(str(TESTS))
    case = "scenario/qwen3/speculative"
    result, entries = run(golden_dir, tmp_path, "--backend", "odd_backends:hang_in_decode", "-o", "tokens=6",
                          "--case", case, "--timeout", "10")
    assert result.exit_code == 1, result.output
    entry = entries[case]
    assert entry["status"] == "timed out"
    assert entry["message"].startswith("no result within 10 s (--timeout) in steps.2 (decode 6 after 7 tokens); ")
    assert entry["first_divergence"] == "steps.2 (decode 6 after 7 tokens)"
    result, entries = run(golden_dir, tmp_path, "--backend", "odd_backends:hang_in_decode", "-o", "tokens=4",
                          "-o", "crash=true", "--case", case)
    assert entries[case]["status"] == "crashed"
    assert "(killed by signal SIGABRT) in steps.3 (decode 4 after 13 tokens); " in entries[case]["message"]
