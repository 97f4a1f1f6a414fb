"""``consortium demo``: a whole study across three local hospitals, on real processes.

The consortium server (SQLite, its own token issuer), a Flower SuperLink with TLS and
SuperNode authentication, and per hospital a SuperNode and a site agent, all on loopback.
See :mod:`concord_demo.story` for the steps.
"""
