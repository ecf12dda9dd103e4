"""A test ClientApp: the project's own handlers behind a mod that makes one
hospital fail (``SKINFED_TEST_FAIL_PARTITION``). The fault injection lives here,
in the tests, not in the product. Importable by the simulation's workers through
PYTHONPATH (the tests add this folder)."""

from __future__ import annotations

import os

from flwr.clientapp import ClientApp

from client import app as hospital


def fail_one_hospital(msg, context, call_next):
    target = os.environ.get("SKINFED_TEST_FAIL_PARTITION", "")
    if target != "" and msg.metadata.message_type != "query" and int(target) == int(
            context.node_config.get("partition-id", -1)):
        raise RuntimeError("injected failure (SKINFED_TEST_FAIL_PARTITION)")
    return call_next(msg, context)


app = ClientApp(mods=[fail_one_hospital])
app.query()(hospital.prepare)
app.train()(hospital.train)
app.evaluate()(hospital.evaluate)
