"""The firewall is usable on its own: importing it (library and CLI) loads no
Flower, and it reads none of the federation's settings."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_privacy_firewall_imports_no_flower():
    code = (
        "import sys\n"
        "import privacy_firewall.cli, privacy_firewall.deidentify, privacy_firewall.evaluate, "
        "privacy_firewall.benchmark, privacy_firewall.training_data, privacy_firewall.watch, models.segmentation\n"
        "from privacy_firewall.backends import load_backend\n"
        "print(sorted(m for m in sys.modules if m == 'flwr' or m.startswith(('flwr.', 'skinfed', 'client', 'server'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_no_package_imports_upwards():
    """privacy_firewall and models never import the Flower apps (client, server,
    skinfed); nothing in the product imports the tests or scripts."""
    for package, forbidden in (("privacy_firewall", ("flwr", "client", "server", "skinfed", "scripts", "tests")),
                               ("models", ("flwr", "client", "server", "skinfed", "scripts", "tests")),
                               ("client", ("scripts", "tests")), ("server", ("scripts", "tests")),
                               ("skinfed", ("scripts", "tests"))):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
                for name in names:
                    assert name.split(".")[0] not in forbidden, f"{path.relative_to(ROOT)} imports {name}"
