"""bakeedit: find the neurons that govern social bias, edit them, and bake the edit into a plain checkpoint."""

__version__ = "0.1.0"
