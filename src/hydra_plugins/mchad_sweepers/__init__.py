"""mchad's Hydra sweepers (Hydra instantiates sweepers only from the ``hydra_plugins`` package)."""
