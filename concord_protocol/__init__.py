"""What a hospital's site node and the consortium server must compute identically.

Concord's two roles, :mod:`consortium_server` and :mod:`site_node`, never import each other
(``make check`` enforces it with import-linter): a hospital's trust boundary is a code
boundary. Everything both sides have to agree on byte for byte lives here, once, and
imports neither role:

* :mod:`~concord_protocol.canonical`: RFC 8785 canonical JSON and its SHA-256;
* :mod:`~concord_protocol.contract`: the declarative study contract and its hash;
* :mod:`~concord_protocol.catalogue`: the model catalogue's data (names, versions, tasks,
  hyperparameter ranges, parameter counts); the torch builders stay at the site;
* :mod:`~concord_protocol.wire`: the encrypted-update wire format, how CKKS contexts are
  read, and the Flower message layout of a round;
* :mod:`~concord_protocol.rounds`: the one typed record of a federated round;
* :mod:`~concord_protocol.audit`: the audit entry format, the RFC 9162 Merkle tree, signed
  tree heads, cosignatures and the pure verification of an exported log;
* :mod:`~concord_protocol.policy`: the Cedar engine, the facts it is shown and the four
  decision points (the server evaluates the consortium's policy, each site its own);
* :mod:`~concord_protocol.sealed_key`: the format of a study key sealed from site to site;
* :mod:`~concord_protocol.release`: the canonical model bytes, their hash, the sign-off;
* :mod:`~concord_protocol.client`, :mod:`~concord_protocol.tokens`: the typed HTTP client
  of the consortium API and OIDC client-credentials tokens;
* :mod:`~concord_protocol.bundle`: the Flower app bundle both sides hash.

Nothing here touches a database, a web framework or torch.
"""
