"""What every package of the project shares, and nothing else: configuration
errors and checks, composing ``conf/`` with Hydra, the one device rule, atomic
file writes and PNG files, and the trainer's input type.

It imports no other package of the project, so each of them (the privacy
firewall, the models, the synthetic clinic, the Flower apps) can import it
without an arrow running back up.
"""
