"""Datasets: the catalogue of what sites hold (metadata only, never records)."""
