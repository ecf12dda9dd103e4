"""Configuration by owner: each package types and checks its own part, each
FlowEdit value has one home, and bad values are refused with what to do."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from privacy_firewall.settings import ConfigError, FlowEditSettings, load_firewall_settings
from skinfed.config import load_run_config

CONF = Path(__file__).resolve().parents[2] / "conf"
FLOWEDIT_KEYS = set(FlowEditSettings.__dataclass_fields__)


def _keys(node, prefix=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield f"{prefix}{k}"
            yield from _keys(v, f"{prefix}{k}.")


def test_each_flowedit_value_has_one_home():
    """FlowEdit values live only in conf/backend/<name>.yaml under flowedit:, and
    the composed settings take them from there (no copy elsewhere in conf/)."""
    homes: dict[str, list[str]] = {}
    for path in sorted(CONF.rglob("*.yaml")):
        for key in _keys(yaml.safe_load(path.read_text()) or {}):
            leaf = key.rsplit(".", 1)[-1]
            if leaf in FLOWEDIT_KEYS and leaf not in ("steps",):  # "steps" is a common word; checked below
                homes.setdefault(leaf, []).append(f"{path.relative_to(CONF)}:{key}")
    for leaf, places in homes.items():
        assert all(p.startswith("backend/") and ":flowedit." in p for p in places), (leaf, places)
    for backend in ("embedded", "sd3", "flux"):
        doc = yaml.safe_load((CONF / "backend" / f"{backend}.yaml").read_text())
        assert set(doc["flowedit"]) == FLOWEDIT_KEYS, backend
        settings = load_firewall_settings([f"backend={backend}"])
        assert {k: getattr(settings.flowedit, k) for k in FLOWEDIT_KEYS} == doc["flowedit"]


def test_an_override_reaches_the_one_setting_and_the_saved_config():
    cfg = load_run_config(["firewall.flowedit.target_guidance=9"])
    assert cfg.firewall.flowedit.target_guidance == 9.0
    assert cfg.to_dict()["firewall"]["flowedit"]["target_guidance"] == 9.0
    assert "target_guidance" not in cfg.to_dict()["firewall"]  # no second copy
    assert load_run_config(["backend=sd3"]).firewall.flowedit.target_guidance == 13.5  # the backend's default


@pytest.mark.parametrize(("override", "message"), [
    ("federation.client_resources.num_cpus=-3", "federation.client_resources.num_cpus"),
    ("federation.client_resources.num_gpus=-1", "federation.client_resources.num_gpus"),
    ("federation.min_available_hospitals=many", "majority"),
    ("federation.dp.mode=sometimes", "federation.dp.mode"),
    ("federation.dp.noise_multiplier=nan", "federation.dp.noise_multiplier=nan must be a finite number"),
    ("federation.dp.delta=1.5", "federation.dp.delta"),
    ("model.decoder_channels=[8]", "model.decoder_channels"),
    ("data.label_source=crowd", "data.label_source"),
    ("firewall.flowedit.n_max=99", "firewall.flowedit.n_max"),
    ("firewall.identity.mode=swap", "firewall.identity.mode"),
    ("backend.model_path=/x", "firewall.backend.model_path"),  # the old key says where it went
    ("firewall.target_guidance=9", "firewall.flowedit.target_guidance"),
])
def test_bad_values_are_refused_with_their_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_run_config([override])
    assert message in str(err.value)


def test_the_firewall_settings_are_the_firewall_s_own():
    """The firewall reads its own part only: no federation, model or data settings."""
    settings = load_firewall_settings([])
    assert set(settings.to_dict()) == {
        "backend", "flowedit", "prompts", "identity", "gate", "mask", "source_sex", "fallback_target_sex",
        "original_healthy_twin", "batch_size", "min_output_std", "cache_dir", "key_file"}


def test_majority_of_the_connected_hospitals():
    f = load_run_config([]).federation
    assert f.num_hospitals is None and f.min_available_hospitals == "majority"
    assert [f.required_hospitals(n) for n in (1, 2, 3, 4, 5)] == [1, 2, 2, 3, 3]
    assert load_run_config(["federation.min_available_hospitals=1"]).federation.required_hospitals(4) == 1


def test_dp_defaults_come_from_conf_only():
    """Flower's DP settings take the run's federation.dp values: DpSettings has no
    defaults of its own for them (conf/federation/default.yaml is their one home)."""
    import dataclasses

    from skinfed.differential_privacy import DpSettings

    fields = {f.name: f for f in dataclasses.fields(DpSettings)}
    for name in ("mode", "noise_multiplier", "clipping_norm", "delta"):
        assert fields[name].default is dataclasses.MISSING, name
    dp = load_run_config(["federation.dp.mode=server-fixed", "federation.dp.noise_multiplier=0.7"]).federation.dp
    settings = DpSettings.from_config(dp, num_sampled_clients=2, population_size=2)
    assert (settings.mode, settings.noise_multiplier, settings.clipping_norm, settings.delta) == (
        "server-fixed", 0.7, dp.clipping_norm, dp.delta)


def test_a_saved_run_config_keeps_its_values_and_gains_new_settings(tmp_path):
    """A run's config.yaml from a version without some setting (here the DP budget
    and the data world) loads with today's defaults for those, its own values for
    the rest."""
    import yaml

    from skinfed.config import load_saved_config

    saved = load_run_config(["federation.num_rounds=3", "federation.dp.noise_multiplier=0.3"]).to_dict()
    del saved["federation"]["dp"]["max_epsilon"], saved["data"]["world"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    cfg = load_saved_config(tmp_path / "config.yaml", ["model.local_epochs=2"])
    current = load_run_config([])
    assert (cfg.federation.num_rounds, cfg.federation.dp.noise_multiplier, cfg.model.local_epochs) == (3, 0.3, 2)
    assert cfg.federation.dp.max_epsilon == current.federation.dp.max_epsilon
    assert cfg.data.world == current.data.world


def test_a_saved_run_of_another_backend_loads_with_that_backends_settings(tmp_path):
    """A run saved with backend=sd3 comes back as an SD3 run (its settings class, not
    the embedded model's), and a key an older version saved is dropped."""
    import yaml

    from skinfed.config import load_saved_config

    saved = load_run_config(["backend=sd3", "firewall.backend.model_path=/models/sd3"]).to_dict()
    saved["firewall"]["backend"]["a_key_of_an_older_version"] = 1
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    cfg = load_saved_config(tmp_path / "config.yaml")
    assert cfg.firewall.backend.name == "sd3" and cfg.firewall.backend.model_path == "/models/sd3"
    assert type(cfg.firewall.backend).__name__ != type(load_run_config([]).firewall.backend).__name__


def test_each_strategy_section_of_the_federation_is_a_registered_strategys_settings():
    """conf/federation/default.yaml holds, per registered strategy with settings,
    exactly its settings' fields, and the composed settings take them from there."""
    import dataclasses

    from skinfed.config import STRATEGY_SETTINGS

    doc = yaml.safe_load((CONF / "federation" / "default.yaml").read_text())
    assert doc["strategy"] in STRATEGY_SETTINGS
    assert set(doc["strategies"]) <= set(STRATEGY_SETTINGS)
    for name, settings in STRATEGY_SETTINGS.items():
        fields = {f.name for f in dataclasses.fields(settings)}
        assert set(doc["strategies"].get(name) or {}) == fields, name
        chosen = load_run_config([f"federation.strategy={name}"]).federation.strategy_settings
        assert dataclasses.asdict(chosen) == (doc["strategies"].get(name) or {})
    # The earlier flat spellings are there, unset: a value lives in its strategy's section.
    assert doc["proximal_mu"] is None and doc["server_learning_rate"] is None
