"""Multi-Class Hypersphere Anomaly Detection (MCHAD) and its baselines for OOD detection.

Importing the package registers the OmegaConf resolvers the configs use (cheap: no torch).
"""

from mchad import resolvers as _resolvers  # noqa: F401

__version__ = "0.1.0"
