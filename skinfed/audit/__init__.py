"""The privacy audit of what leaves a hospital (``skinfed-audit``).

An attacker who sees a hospital's update (the server, or anyone who sees the
global model) tries to (1) link it to a patient in a gallery of candidate
photos (:mod:`skinfed.audit.linkage`) and (2) reconstruct the training image
from it (:mod:`skinfed.audit.inversion`), with the privacy firewall on (the
hospital trained on surrogates), off (raw photos: the reference) and with
differential privacy on the update (:mod:`skinfed.audit.dp_view`).
:mod:`skinfed.audit.experiment` runs the whole audit; :mod:`skinfed.audit.cli`
is the command. The attack code imports neither Flower nor the project config.
"""
