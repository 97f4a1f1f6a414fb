"""Concord consortium server: studies, catalogue, identity, policies, audit log, federation."""

__version__ = "0.1.0"
