"""The firewall is usable on its own: importing it (library and CLI) loads no Flower."""

from __future__ import annotations

import subprocess
import sys


def test_privacy_firewall_imports_no_flower():
    code = (
        "import sys\n"
        "import privacy_firewall.cli, privacy_firewall.deidentify, privacy_firewall.evaluate, "
        "privacy_firewall.benchmark, privacy_firewall.training_data, models.segmentation\n"
        "from privacy_firewall.backends import load_backend\n"
        "print(sorted(m for m in sys.modules if m == 'flwr' or m.startswith('flwr.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
