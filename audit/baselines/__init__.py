"""Single-image segmenters the differential mask is measured against, beside the
product's own colour rule (:mod:`privacy_firewall.baselines.colour_rule`):

* :class:`~audit.baselines.grounded_sam.GroundedSam`: a text-prompted detector
  (Grounding DINO) whose boxes prompt SAM, through ``transformers``, from local
  weights only. Never a default: a hospital that has the weights points the
  benchmark at them.
"""
