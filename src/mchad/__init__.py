"""Multi-Class Hypersphere Anomaly Detection (MCHAD) and its baselines for OOD detection.

Importing the package registers the OmegaConf resolvers the configs use and the experiment
configs generated from the method registry (cheap: no torch).
"""

import mchad.resolvers  # noqa: F401  (registers the resolvers)
from mchad.registry import register_experiments as _register_experiments

_register_experiments()

__version__ = "0.1.0"
