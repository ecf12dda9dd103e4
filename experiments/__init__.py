"""Experiments over the whole system: they may use every package (the firewall,
the hospitals' data path, the federation), and no product package imports them."""
