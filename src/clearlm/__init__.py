"""clearlm: train, evaluate and release a fully open language model."""

from clearlm.numerics import set_environment

__version__ = "0.1.0"

set_environment()  # before torch is imported: MKL reads its reproducibility mode once, at its first call
