import subprocess
import sys


def test_env_reports_versions_extension_and_backends():
    result = subprocess.run([sys.executable, "-m", "qft", "env"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for key in ("python", "torch", "triton", "extension qft._C", "extension qft._cpu", "GPU", "op quantize on cpu"):
        assert key in out, key
    assert "reference" in out  # quantize runs the reference on CPU, with or without qft._cpu


def test_unknown_command_fails():
    result = subprocess.run([sys.executable, "-m", "qft", "fly"], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "invalid choice" in result.stderr
