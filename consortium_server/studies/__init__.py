"""Studies: the declarative study contract, its lifecycle and per-site approvals."""
