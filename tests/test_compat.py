"""Tier 1: DeepEP code runs unchanged through ``python -m deep_ep_ops.compat``; a real DeepEP wins."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import sys
    from deep_ep import Buffer, Config
    from deep_ep.utils import EventOverlap, EventHandle
    print(Buffer.__module__, Config.__name__, EventOverlap.__module__, sys.argv[1:])
""")


def _run(tmp_path, extra_path=None):
    script = tmp_path / "uses_deep_ep.py"
    script.write_text(SCRIPT)
    env = dict(os.environ)
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "deep_ep_ops.compat", str(script), "--flag", "1"],
                          capture_output=True, text=True, env=env, timeout=120)


def test_alias_runs_deep_ep_code(tmp_path):
    out = _run(tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["deep_ep_ops.buffer", "Config", "deep_ep_ops.utils", "['--flag',", "'1']"]


def test_real_deep_ep_is_not_shadowed(tmp_path):
    real = tmp_path / "site" / "deep_ep"
    real.mkdir(parents=True)
    (real / "__init__.py").write_text("class Buffer: pass\nclass Config: pass\n")
    (real / "utils.py").write_text("class EventOverlap: pass\nclass EventHandle: pass\n")
    out = _run(tmp_path, extra_path=tmp_path / "site")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "deep_ep" and out.stdout.split()[2] == "deep_ep.utils"
