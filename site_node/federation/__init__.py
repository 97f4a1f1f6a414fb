"""Federation on the site side: the Flower ClientApp, its contract guard, local approvals.

* :mod:`site_node.federation.clientapp`: ``app``, the ClientApp (DP training, CKKS updates).
* :mod:`site_node.federation.mods`: :class:`ContractGuardMod`.
* :mod:`site_node.federation.approvals`: :class:`ApprovalStore` (approved contract hashes,
  study keys, accepted app bundles) under the site's state dir.
* :mod:`site_node.federation.processes`: start a SuperNode whose ClientApp runner refuses
  any app bundle the site does not allow.
* :mod:`site_node.federation.warm`: the warm ClientApp runner, which keeps torch, MONAI,
  Opacus, TenSEAL and Flower imported and forks a worker per message.

The app bundle both roles hash is :mod:`concord_protocol.bundle`. Nothing is imported here,
so that ``import site_node.federation`` does not pull in torch.
"""
