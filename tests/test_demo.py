"""The main job runs end to end, as the README's first command does (in CI's fresh venv: no NumPy)."""

import subprocess
import sys

import pytest


@pytest.mark.distributed
def test_demo_runs_and_passes():
    out = subprocess.run([sys.executable, "-m", "deep_ep_ops.demo", "--ranks", "2", "--tokens", "24", "--hidden", "64",
                          "--intermediate", "32", "--experts", "4", "--topk", "2", "--steps", "2"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step 2/2" in out.stdout
    assert "PASS: 2 steps on 2 ranks; max |out - reference| = 0 (must be 0)" in out.stdout, out.stdout


def test_demo_rejects_bad_arguments():
    out = subprocess.run([sys.executable, "-m", "deep_ep_ops.demo", "--ranks", "3", "--experts", "16"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "need --experts divisible by --ranks" in out.stderr
