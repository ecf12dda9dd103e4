"""The attacker's side and the research harness: everything the product is measured with.

* :mod:`audit.reidentification`: attacks on surrogates (pixel nearest neighbour,
  a matcher trained on the attacker's own firewall outputs, keyless replay,
  mask attackers);
* :mod:`audit.evaluate`: the firewall scored on held-out synthetic subjects
  (quality and the attacks above), ``privacy-firewall evaluate``;
* :mod:`audit.benchmark`: seconds and network evaluations per photo,
  ``privacy-firewall benchmark``;
* :mod:`audit.baselines`: segmenters the differential mask is compared with;
* :mod:`audit.updates`: attacks on what leaves a hospital (update linkage,
  gradient inversion, membership inference), ``skinfed-audit``.

The product (``privacy_firewall``, ``skinfed``, ``client``, ``server``) never
imports this package: the firewall's CLI finds ``evaluate`` and ``benchmark``
as installed extension commands (the ``privacy_firewall.commands`` entry
points, :mod:`audit.cli`), so a hospital's image can leave the attacks out.
"""
