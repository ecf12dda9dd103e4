"""The Flower app around the firewall: the run's configuration, the simulated
hospitals' data, what a hospital sends back, privacy accounting and the launcher.

``client/`` (the ClientApp) and ``server/`` (the ServerApp) read their settings
from :mod:`skinfed.config`; the firewall (``privacy_firewall``) and the U-Net
(``models``) own theirs and know nothing of Flower.
"""
