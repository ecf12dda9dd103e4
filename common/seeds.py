"""Seeds several packages must agree on."""

#: The synthetic clinic seed no shipped model is trained on (the embedded
#: generator, its identity matcher and judges): the held-out faces of
#: ``privacy-firewall evaluate``, the sweeps' firewall scores, the calibration of
#: the embedded model's out-of-distribution limit and the developers' scripts.
HELD_OUT_CLINIC_SEED = 777
