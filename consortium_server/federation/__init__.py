"""Federation on the consortium side: the Flower ServerApp and blind aggregation.

``blind_sum`` (in :mod:`consortium_server.federation.blind_sum`) adds the sites' CKKS
updates with the study's public context only; the server never holds a secret key.
"""
