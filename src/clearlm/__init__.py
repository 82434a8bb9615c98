"""clearlm: train, evaluate and release a fully open language model."""

__version__ = "0.1.0"
