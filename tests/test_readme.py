"""The README's fresh-machine commands are the ones CI runs."""

from conftest import ROOT


def readme_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    return [line for line in lines[:12] if line.startswith("python3 -m venv")]


def test_readme_opens_with_two_fresh_machine_commands():
    cmds = readme_commands()
    assert len(cmds) == 2
    assert cmds[0].endswith("llm-conformance run --backend transformers")
    assert "pytest" in cmds[1]


def test_ci_runs_the_readme_test_command_verbatim():
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci_lines
