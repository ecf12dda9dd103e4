"""docker-compose.yml under a real Docker engine (slow, needs Docker): the stack
survives a lost hospital. The steps and checks are in tests/system/docker_stack.py,
which also runs as a script (``python -m tests.system.docker_stack``)."""

from __future__ import annotations

import json

import pytest

from tests.system.docker_stack import build_image, docker_available, run_check

pytestmark = pytest.mark.slow


@pytest.mark.skipif(not docker_available(), reason="needs a running Docker engine (see scripts/deployment_check.sh)")
def test_compose_stack_survives_a_lost_hospital(tmp_path):
    build_image()
    result = run_check(tmp_path)
    print(json.dumps(result, indent=2))
    assert result.get("ok")


