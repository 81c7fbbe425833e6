"""The model tools answer --help with a usage line and exit 0, without importing megatron."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("tool", ["convert_hf_checkpoint.py", "verify_checkpoint.py", "init_model.py"])
def test_help(tool):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", tool), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-1000:]
    assert proc.stdout.startswith("usage: " + tool) and "options:" in proc.stdout
    assert "Traceback" not in proc.stderr and "megatron" not in proc.stderr
