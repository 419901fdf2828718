"""The GPU checks' script, .ci/gpu, refuses bad arguments before any check runs: one line, exit status 2, nothing
written. (Its checks themselves need a CUDA GPU; README, The GPU checks.)

Run: python -m pytest -q tests/test_ci_gpu.py (seconds)
"""
import os
import subprocess

import pytest

from conftest import ROOT


@pytest.mark.parametrize("argv, message", [
    # Without OUT_DIR the script ran every default check, its results written to /.
    ([], "usage: bash .ci/gpu OUT_DIR [DATA] [CHECK ...]: OUT_DIR, where the results go, must be named"),
    (["", "", "bench"], "usage: bash .ci/gpu OUT_DIR [DATA] [CHECK ...]: OUT_DIR, where the results go, must be named"),
    (["{out}", "", "nonsense"], "unknown check nonsense; the checks are:"),
    (["{out}", "bench"], "DATA bench is neither a zip nor a folder with train/ in it"),
])
def test_bad_arguments_are_one_line_with_status_2_and_write_nothing(tmp_path, argv, message):
    out = tmp_path / "out"
    # No interpreter and 1-second limits: were the refusal to fail, the checks would end at once, not run for minutes.
    env = {**os.environ, "PYTHON": "false", "CHECK_LIMIT_S": "1", "TESTS_LIMIT_S": "1"}
    proc = subprocess.run(["bash", os.path.join(ROOT, ".ci", "gpu"), *(a.format(out=out) for a in argv)],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(message), proc.stderr
    assert os.listdir(tmp_path) == [] and proc.stdout == ""
