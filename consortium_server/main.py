"""The application factory: ``create_app(settings)``. The lifespan owns the engine."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from consortium_server import __version__
from consortium_server.api.errors import install_error_handlers
from consortium_server.api.health import router as health_router
from consortium_server.api.middleware import HttpMetrics, RequestContextMiddleware
from consortium_server.datasets.router import router as datasets_router
from consortium_server.db.migrate import upgrade_to_head
from consortium_server.db.session import make_engine, make_sessionmaker
from consortium_server.identity.factory import build_local_issuer, build_verifier
from consortium_server.identity.router import router as identity_router
from consortium_server.settings import ServerSettings
from consortium_server.sites.router import router as sites_router
from consortium_server.studies.router import router as studies_router

__all__ = ["create_app"]

log = logging.getLogger("concord.server")

DESCRIPTION = """
Concord coordinates federated studies across hospitals. Researchers browse the dataset
catalogue and submit declarative study contracts; each site's data steward approves the
exact contract hash; the federation trains with differential privacy and encrypted updates.

Every request needs `Authorization: Bearer <access token>` from the consortium's identity
provider (Keycloak, or the built-in issuer in development). Errors have the shape
`{"error": {"code", "message", "details", "request_id"}}` with stable codes.
"""


def create_app(settings: ServerSettings) -> FastAPI:
    """Build the consortium server. Nothing is connected until the lifespan starts."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(
            settings.database_url(),
            echo=settings.database.echo,
            pool_size=settings.database.pool_size,
        )
        if settings.database.auto_migrate:
            upgrade_to_head(engine)
        local_issuer = build_local_issuer(settings) if settings.identity.mode == "local" else None
        app.state.engine = engine
        app.state.sessionmaker = make_sessionmaker(engine)
        app.state.local_issuer = local_issuer
        app.state.verifier = build_verifier(settings, local_issuer=local_issuer)
        log.info(
            "consortium server ready",
            extra={"identity": settings.identity.mode, "database": engine.dialect.name},
        )
        try:
            yield
        finally:
            engine.dispose()

    app = FastAPI(
        title="Concord consortium API",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.settings = settings
    registry = CollectorRegistry()
    app.state.metrics_registry = registry
    app.add_middleware(
        RequestContextMiddleware,
        max_body_bytes=settings.api.max_body_bytes,
        metrics=HttpMetrics(registry),
    )
    install_error_handlers(app)
    for router in (health_router, identity_router, sites_router, datasets_router, studies_router):
        app.include_router(router)
    return app
