"""What an observer sees of one hospital's update under Flower's central DP.

Flower's client-side fixed clipping (``fixedclipping_mod``) scales the whole
update to L2 norm at most ``C``; the server averages the ``n`` sampled clients'
clipped updates and adds Gaussian noise of standard deviation ``z C / n`` per
coordinate (``DifferentialPrivacyClientSideFixedClipping``). Two observers:

* the **server** itself receives the clipped update *before* any noise: central
  DP does not hide a single update from the server that aggregates it;
* anyone who sees the **noised aggregate** (the other hospitals, whoever gets the
  model). In the worst case that observer knows the other clients' updates and
  subtracts them, leaving ``n`` x (clipped update / n + noise) = clipped update +
  N(0, (z C)^2) per coordinate: the view the audit attacks.

Clipping and the noise's standard deviation are Flower's own functions; the
noise is drawn from a seeded generator so an audit can be repeated (Flower's
``add_gaussian_noise_inplace`` draws from numpy's global state).
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.supercore.differential_privacy import clip_inputs_inplace, compute_stdv, get_norm

from audit.updates.capture import Update


def clipped(update: Update, clipping_norm: float) -> Update:
    """The update scaled to L2 norm <= ``clipping_norm`` (Flower's flat clipping)."""
    names = list(update)
    arrays = [update[n].detach().float().numpy().copy() for n in names]
    clip_inputs_inplace(arrays, clipping_norm)
    return {n: torch.from_numpy(a).float() for n, a in zip(names, arrays)}


def norm(update: Update) -> float:
    """L2 norm of the whole update (Flower's ``get_norm``)."""
    return get_norm([t.detach().double().numpy() for t in update.values()])


def observed_under_central_dp(update: Update, clipping_norm: float, noise_multiplier: float, num_sampled_clients: int,
                              generator: np.random.Generator) -> Update:
    """One client's update as a worst-case observer of the noised aggregate sees
    it: clipped, plus Gaussian noise of ``num_sampled_clients`` x Flower's
    per-aggregate standard deviation (= ``noise_multiplier * clipping_norm``)."""
    std = num_sampled_clients * compute_stdv(noise_multiplier, clipping_norm, num_sampled_clients)
    out = clipped(update, clipping_norm)
    if std > 0:
        for name, tensor in out.items():
            noise = generator.standard_normal(size=tuple(tensor.shape), dtype=np.float32)
            out[name] = tensor + std * torch.from_numpy(noise)
    return out
