"""Models: the Lightning module (module), the methods and their losses, backbones and OOD detectors."""
