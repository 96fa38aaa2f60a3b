"""Multi-Class Hypersphere Anomaly Detection (MCHAD) and its baselines for OOD detection.

Importing the package registers the OmegaConf resolvers the configs use and the generated
open-set experiment configs (cheap: no torch).
"""

from mchad.resolvers import register_experiments as _register_experiments

_register_experiments()

__version__ = "0.1.0"
