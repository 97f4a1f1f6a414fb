"""The server's tamper-evident audit log: storage, signing, cosignatures, HTTP.

The format and its verification are shared with sites and third parties
(:mod:`concord_protocol.audit`). Here: ``log`` (append, proofs, stored in the database),
``signer`` (the tree-head key), ``cosignatures`` (stored site cosignatures, quorum),
``recorder`` (audit entries for domain events), ``export`` / ``verify`` (the stored log as
an export, and its live check), ``router``.
"""
