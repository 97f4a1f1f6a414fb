"""The site agent (``site-node run``): keeps a hospital's site node in step with the consortium.

Each pass: the pinned peers follow signed key rotations (:mod:`site_node.peers`);
:func:`sync_approvals` follows the studies this site approved itself (re-hashed here) and
checks the other members' signed approvals; :func:`exchange_keys` creates or receives each
study's CKKS key, sealed site to site with pinned keys; :func:`cosign_latest` cosigns the
audit log's tree head as a witness. :class:`SiteAgent` runs the passes with retries and
:func:`run_agent` is the command's entry point.
"""

from site_node.agent.key_exchange import KeyResult, exchange_keys
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
    "run_agent",
    "sync_approvals",
    "token_provider",
]
