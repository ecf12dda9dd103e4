"""The project's Hydra configuration (YAML files in this folder).

A package so that the YAML ships with the installed project and with the Flower
app bundle; :func:`privacy_firewall.config.load_config` composes it.
"""
