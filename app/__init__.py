"""advguard: a guard in front of an image classifier that rejects predictions a kNN search over
the training set's deep features does not support (Carrara et al. 2017)."""

__version__ = "0.1.0"
