"""Differential privacy for the federation, built on Flower's own pieces.

Flower 1.42 ships central DP for the Message API as strategy wrappers
(``flwr.serverapp.strategy.DifferentialPrivacy{Client,Server}Side{Fixed,Adaptive}Clipping``)
with matching client mods (``flwr.clientapp.mod.fixedclipping_mod``,
``adaptiveclipping_mod``), and an RDP accountant
(``flwr.supercore.privacy_accounting.rdp_accountant.RdpAccountant``, a wrapper of
Google's ``dp-accounting``: ``pip install "flwr[dp]"``). This module puts them
together for the project:

* :func:`wrap_strategy` wraps the configured strategy in the matching Flower wrapper;
* :func:`dp_train_mod` is the ClientApp's train mod: it runs Flower's clipping
  mod the server asked for (the ClientApp is built before the run's config is
  known, so the server says which in the train config, see :func:`dp_train_config`);
* :class:`PrivacyLedger` reports epsilon (at the configured delta) after each round.

What the guarantee covers: *hospital-level* (epsilon, delta)-DP of the sequence
of noised global models, against anyone who sees them (other hospitals, whoever
gets the model). It is central DP: the server receives each hospital's clipped
update without noise, so it does not protect an update from the server itself
(``LocalDpMod`` or secure aggregation would).

Three things the project must do with it:

* under DP every hospital must weigh the same in the average: FedAvg weighs by
  ``num-examples``, and the noise (``z C / n``) is calibrated for equal weights;
  :func:`dp_train_mod` reports ``num-examples = 1`` when the server asks for it;
* BatchNorm's running variances are averaged and noised too and can come back
  negative: :func:`clamp_running_variances` before the model is used;
* integer step counters (``num_batches_tracked``) are part of ``state_dict()``
  and would count in the update's norm: leave them out of what is sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import Context, Message
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)

MODES = ("off", "client-fixed", "client-adaptive", "server-fixed", "server-adaptive")

# Train-config keys the server sends so the ClientApp's mod knows what to do.
DP_CLIPPING_KEY = "dp-clipping"  # "fixed" | "adaptive" | "server" (clients do not clip)
DP_UNIFORM_WEIGHT_KEY = "dp-uniform-weight"  # name of the weight metric to set to 1, or ""


@dataclass(frozen=True)
class DpSettings:
    """Differential privacy of one federation.

    ``clipping_norm`` is the fixed norm, or the initial norm of adaptive clipping;
    ``num_sampled_clients`` the hospitals that train each round (Flower's noise is
    ``noise_multiplier * clipping_norm / num_sampled_clients`` on the average);
    ``population_size`` the hospitals they are drawn from; ``delta`` the delta of
    the epsilon reported. The adaptive modes' quantile settings are Flower's
    (Andrew et al. 2021); ``clipped_count_stddev`` must exceed
    ``noise_multiplier / 2`` (Flower's default, ``num_sampled_clients / 20``, is
    0.2 for 4 hospitals).

    The first four values are the run's ``federation.dp`` settings, with their
    defaults in ``conf/federation/default.yaml`` and checked there
    (``skinfed.config.DifferentialPrivacySettings``); this class checks only what
    needs the federation's size too."""

    mode: str
    noise_multiplier: float
    clipping_norm: float
    num_sampled_clients: int
    population_size: int
    delta: float
    target_clipped_quantile: float = 0.5
    clip_norm_lr: float = 0.2
    clipped_count_stddev: float | None = None
    uniform_weights: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:  # a mode of another kind (patient) must not reach Flower's wrappers
            raise ValueError(f"dp mode {self.mode!r} is not one of Flower's: {', '.join(MODES)}")
        if not 1 <= self.num_sampled_clients <= self.population_size:
            raise ValueError(f"num_sampled_clients={self.num_sampled_clients} must be in 1..population_size "
                             f"({self.population_size})")
        if self.adaptive and self.noise_multiplier > 0:
            stddev = self.clipped_count_stddev if self.clipped_count_stddev is not None else self.num_sampled_clients / 20
            if self.noise_multiplier >= 2 * stddev:
                raise ValueError(
                    f"adaptive clipping with noise_multiplier={self.noise_multiplier} needs clipped_count_stddev > "
                    f"{self.noise_multiplier / 2} (now {stddev}: Flower's default is num_sampled_clients / 20)"
                )

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @property
    def adaptive(self) -> bool:
        return self.mode.endswith("adaptive")

    @property
    def client_side(self) -> bool:
        return self.mode.startswith("client")

    @classmethod
    def from_config(cls, dp: Any, num_sampled_clients: int, population_size: int, **extra: Any) -> DpSettings:
        """From the run config's ``federation.dp`` (anything with ``mode``,
        ``noise_multiplier``, ``clipping_norm``, ``delta``) and the federation's size."""
        # Patient-level DP (mode patient) is DP-SGD inside the hospitals' training
        # (skinfed.patient_privacy): Flower's central DP stays off.
        mode = "off" if dp.mode == "patient" else dp.mode
        return cls(mode=mode, noise_multiplier=float(dp.noise_multiplier), clipping_norm=float(dp.clipping_norm),
                   delta=float(dp.delta), num_sampled_clients=num_sampled_clients, population_size=population_size,
                   **extra)


# ----------------------------------------------------------------------------- server
def wrap_strategy(strategy: Strategy, settings: DpSettings) -> Strategy:
    """``strategy`` inside the Flower DP wrapper of ``settings.mode`` (unchanged
    when DP is off). Keep a reference to the inner strategy for its own state."""
    if not settings.enabled:
        return strategy
    if settings.adaptive:
        wrapper = (DifferentialPrivacyClientSideAdaptiveClipping if settings.client_side
                   else DifferentialPrivacyServerSideAdaptiveClipping)
        return wrapper(
            strategy, settings.noise_multiplier, settings.num_sampled_clients,
            initial_clipping_norm=settings.clipping_norm, target_clipped_quantile=settings.target_clipped_quantile,
            clip_norm_lr=settings.clip_norm_lr, clipped_count_stddev=settings.clipped_count_stddev,
        )
    wrapper = (DifferentialPrivacyClientSideFixedClipping if settings.client_side
               else DifferentialPrivacyServerSideFixedClipping)
    return wrapper(strategy, settings.noise_multiplier, settings.clipping_norm, settings.num_sampled_clients)


def dp_train_config(settings: DpSettings, weighted_by_key: str = "num-examples") -> dict[str, str]:
    """Entries to add to the train ConfigRecord so :func:`dp_train_mod` does what
    ``settings`` needs (empty when DP is off)."""
    if not settings.enabled:
        return {}
    clipping = ("adaptive" if settings.adaptive else "fixed") if settings.client_side else "server"
    return {DP_CLIPPING_KEY: clipping, DP_UNIFORM_WEIGHT_KEY: weighted_by_key if settings.uniform_weights else ""}


# ----------------------------------------------------------------------------- client
def client_mods(settings: DpSettings) -> list[Mod]:
    """Flower's client mods for ``settings``, for a ClientApp built when the
    settings are known (the project's ClientApp uses :func:`dp_train_mod`)."""
    if not settings.enabled or not settings.client_side:
        return []
    return [adaptiveclipping_mod if settings.adaptive else fixedclipping_mod]


def dp_train_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """The ClientApp's train mod: Flower's ``fixedclipping_mod`` or
    ``adaptiveclipping_mod`` when the server's train config asks for it (see
    :func:`dp_train_config`), and equal weights in the average; nothing otherwise.
    Use as ``@app.train(mods=[dp_train_mod])``."""
    configs = list(msg.content.config_records.values())
    config = configs[0] if len(configs) == 1 else {}
    clipping = config.get(DP_CLIPPING_KEY)
    if clipping is None:
        return call_next(msg, ctxt)
    weight_key = str(config.get(DP_UNIFORM_WEIGHT_KEY, ""))

    def train_with_uniform_weight(m: Message, c: Context) -> Message:
        reply = call_next(m, c)
        if weight_key and not reply.has_error():
            for record in reply.content.metric_records.values():
                if weight_key in record:
                    record[weight_key] = 1
        return reply

    if clipping == "server":
        return train_with_uniform_weight(msg, ctxt)
    clip_mod = {"fixed": fixedclipping_mod, "adaptive": adaptiveclipping_mod}.get(str(clipping))
    if clip_mod is None:
        raise ValueError(f"unknown {DP_CLIPPING_KEY}={clipping!r} in the train config")
    return clip_mod(msg, ctxt, train_with_uniform_weight)


def without_step_counters(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state to send under DP: integer buffers (BatchNorm's step counters)
    left out, so they neither dominate the update's norm nor get noised. Load the
    result back with ``load_state_dict(..., strict=False)``."""
    return {k: v for k, v in state_dict.items() if v.is_floating_point()}


def clamp_running_variances(state_dict: Mapping[str, torch.Tensor], minimum: float = 1e-5) -> int:
    """Clamp BatchNorm running variances in place to ``minimum`` (noise can make
    them negative, and a negative variance turns the model's output into NaN);
    returns how many values were clamped."""
    clamped = 0
    for name, tensor in state_dict.items():
        if name.endswith("running_var"):
            low = tensor < minimum
            clamped += int(low.sum())
            tensor.clamp_(min=minimum)
    return clamped


# ----------------------------------------------------------------------------- accounting
ACCOUNTANT = ("flwr.supercore.privacy_accounting.rdp_accountant.RdpAccountant (Google dp-accounting RDP), "
              "hospital-level add-or-remove-one, no sampling amplification")


class PrivacyLedger:
    """Cumulative epsilon of the released global models, one Gaussian release
    per round, from Flower's RDP accountant.

    Sampling amplification is not claimed (hospitals are not Poisson-sampled),
    so epsilon depends on the noise multiplier and the number of rounds only.
    For adaptive clipping the noise multiplier is the total one (Flower splits it
    between the update and the clipped count, Andrew et al. 2021)."""

    def __init__(self, settings: DpSettings) -> None:
        from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

        if not settings.enabled or settings.noise_multiplier <= 0:
            raise ValueError("epsilon is only defined with DP on and a positive noise multiplier")
        self.settings = settings
        self.accountant = RdpAccountant(PrivacyConfig(
            target_delta=settings.delta, population_size=settings.population_size,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        ))

    def record_round(self, num_clients: int | None = None) -> float:
        """Account one released round (``num_clients`` that trained, default the
        configured sample) and return the cumulative epsilon at ``delta``."""
        event = GaussianPrivacyEvent(
            noise_multiplier=self.settings.noise_multiplier,
            sample_size=num_clients or self.settings.num_sampled_clients,
            population_size=self.settings.population_size,
        )
        self.accountant.compose(event)
        return self.epsilon

    @property
    def epsilon(self) -> float:
        return self.accountant.get_epsilon(self.settings.delta) if self.accountant.num_releases else 0.0

    @property
    def rounds(self) -> int:
        return self.accountant.num_releases

    def summary(self) -> dict[str, Any]:
        """For metrics.json / the run summary."""
        return {"epsilon": self.epsilon, "delta": self.settings.delta, "rounds": self.rounds,
                "noise_multiplier": self.settings.noise_multiplier, "mode": self.settings.mode,
                "accountant": ACCOUNTANT}

    def state_dict(self) -> dict[str, object]:
        """For the checkpoint (a resumed run goes on counting)."""
        return self.accountant.state_dict()

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.accountant.load_state_dict(state)


def epsilon_per_round(settings: DpSettings, num_rounds: int) -> list[float]:
    """Cumulative epsilon at ``settings.delta`` after each of ``num_rounds`` rounds."""
    ledger = PrivacyLedger(settings)
    return [ledger.record_round() for _ in range(num_rounds)]
