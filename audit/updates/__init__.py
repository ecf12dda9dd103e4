"""The privacy audit of what leaves a hospital (``skinfed-audit``).

An attacker who sees a hospital's update (the server, or anyone who sees the
global model) tries to (1) link it to a patient in a gallery of candidate
photos (:mod:`audit.updates.linkage`) and (2) reconstruct the training image
from it (:mod:`audit.updates.inversion`), with the privacy firewall on (the
hospital trained on surrogates), off (raw photos: the reference) and with
differential privacy on the update (:mod:`audit.updates.dp_view`).
:mod:`audit.updates.experiment` runs the whole audit; :mod:`audit.updates.cli`
is the command. The attack code imports neither Flower nor the project config.
"""
