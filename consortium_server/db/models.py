"""Import every ORM module so ``Base.metadata`` is complete (Alembic, tests)."""

from __future__ import annotations

from consortium_server.audit import models as audit_models  # noqa: F401
from consortium_server.budgets import models as budgets_models  # noqa: F401
from consortium_server.datasets import models as datasets_models
from consortium_server.db.base import Base
from consortium_server.federation import checkpoints as federation_checkpoints  # noqa: F401
from consortium_server.federation import models as federation_models  # noqa: F401
from consortium_server.federation import study_runs as federation_study_runs  # noqa: F401
from consortium_server.sites import models as sites_models
from consortium_server.studies import models as studies_models

__all__ = ["Base", "datasets_models", "sites_models", "studies_models"]
