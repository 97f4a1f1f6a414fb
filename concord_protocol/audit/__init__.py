"""The audit log's published format and its pure verification (no database).

* :mod:`~concord_protocol.audit.entries`: what an entry holds and its canonical bytes;
* :mod:`~concord_protocol.audit.merkle`: RFC 9162 hashing, proofs and proof checks;
* :mod:`~concord_protocol.audit.heads`: signed tree heads and their verification;
* :mod:`~concord_protocol.audit.cosignatures`: sites' cosignatures and their verification;
* :mod:`~concord_protocol.audit.export`, :mod:`~concord_protocol.audit.verify`: the export
  file and its end-to-end check, which a site or a third party runs with keys it holds.
"""
