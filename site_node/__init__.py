"""Concord site node: local data, DP training, CKKS encryption, the Flower ClientApp."""

__version__ = "0.1.0"
