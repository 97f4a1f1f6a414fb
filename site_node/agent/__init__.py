"""The site agent (``site-node run``): keeps a hospital's site node in step with the consortium.

Each pass: :func:`sync_approvals` mirrors approved study contracts (re-hashed here) into the
local :class:`~site_node.federation.approvals.ApprovalStore`; :func:`exchange_keys` creates
or receives each study's CKKS key, sealed site to site; :func:`cosign_latest` cosigns the
audit log's tree head as a witness. :class:`SiteAgent` runs the passes with retries and
:func:`run_agent` is the command's entry point.
"""

from site_node.agent.key_exchange import KeyResult, exchange_keys, generating_site
from site_node.agent.loop import PassReport, SiteAgent, StepOutcome, run_agent, token_provider
from site_node.agent.sync import ActiveStudy, AgentError, SyncResult, sync_approvals
from site_node.agent.witness import WitnessResult, cosign_latest

__all__ = [
    "ActiveStudy",
    "AgentError",
    "KeyResult",
    "PassReport",
    "SiteAgent",
    "StepOutcome",
    "SyncResult",
    "WitnessResult",
    "cosign_latest",
    "exchange_keys",
    "generating_site",
    "run_agent",
    "sync_approvals",
    "token_provider",
]
