"""The application factory: ``create_app(settings)``. The lifespan owns the engine."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from prometheus_client import CollectorRegistry
from sqlalchemy.exc import OperationalError

from concord_protocol.catalogue import catalogue_keys
from concord_protocol.policy.engine import SCHEMA_FILENAME, PolicyEngine
from consortium_server import __version__
from consortium_server.api.deps import current_principal, record_refusal_summary, refused_sign_ins
from consortium_server.api.errors import install_error_handlers
from consortium_server.api.health import router as health_router
from consortium_server.api.middleware import HttpMetrics, LargerLimit, RequestContextMiddleware
from consortium_server.api.openapi import install_openapi
from consortium_server.audit.log import AuditLog
from consortium_server.audit.recorder import AuditRecorder
from consortium_server.audit.router import router as audit_router
from consortium_server.audit.signer import TreeHeadSigner
from consortium_server.budgets.router import router as budgets_router
from consortium_server.datasets.router import router as datasets_router
from consortium_server.db.migrate import upgrade_to_head
from consortium_server.db.session import make_engine, make_sessionmaker, session_scope
from consortium_server.federation.federation_token import load_or_create_token, load_token
from consortium_server.federation.internal_router import require_serverapp
from consortium_server.federation.internal_router import router as internal_router
from consortium_server.federation.router import router as federation_router
from consortium_server.federation.runs import build_run_manager, connect_superlink
from consortium_server.federation.supernodes import FlwrSuperNodeRegistry
from consortium_server.identity.factory import build_local_issuer, build_verifier
from consortium_server.identity.router import router as identity_router
from consortium_server.policy.checks import PolicyContext
from consortium_server.policy.router import router as policy_router
from consortium_server.policy.service import active_version
from consortium_server.release.router import router as release_router
from consortium_server.reports.router import router as reports_router
from consortium_server.settings import ServerSettings
from consortium_server.sites.router import router as sites_router
from consortium_server.studies.router import router as studies_router

__all__ = ["create_app"]

#: The study-key relay carries one sealed CKKS key (~175 KB) per site.
KEY_RELAY_PATH = re.compile(r"/api/v1/studies/[^/]+/keys")
#: A site uploads the released model (float64 parameters: 8 bytes each).
MODEL_UPLOAD_PATH = re.compile(r"/api/v1/studies/[^/]+/release/model")
#: The ServerApp uploads each round's encrypted aggregate.
CHECKPOINT_PATH = re.compile(
    r"/internal/v1/federation/studies/[^/]+/runs/[^/]+/rounds/\d+/checkpoint"
)

log = logging.getLogger("concord.server")

DESCRIPTION = """
Concord coordinates federated studies across hospitals. Researchers browse the dataset
catalogue and submit declarative study contracts; each site's data steward approves the
exact contract hash; the federation trains with differential privacy and encrypted updates.

Every request needs `Authorization: Bearer <access token>` from the consortium's identity
provider (Keycloak, or the built-in issuer in development). Errors have the shape
`{"error": {"code", "message", "details", "request_id"}}` with stable codes.
"""


def _seed_policies(app: FastAPI, settings: ServerSettings) -> None:
    """Validate the policy directory (an invalid policy stops start-up with the file, line
    and reason), then load the active set, seeding version 1 at first start. If the
    database does not answer yet, seeding happens on first use instead."""
    directory = settings.policy_directory()
    PolicyEngine.load(directory / "consortium", directory / SCHEMA_FILENAME)
    try:
        with session_scope(app.state.sessionmaker) as session:
            seeded = active_version(session) is None
            engine = app.state.policy_context.engine(session)
            if seeded:
                AuditRecorder(
                    app.state.audit_log, session, principal=None, source="consortium-server"
                ).record(
                    "policy.published",
                    object_type="policy_set",
                    object_id="1",
                    policy_set_hash=engine.policy_set_hash,
                    policy_allowed=True,
                    details={"note": "seeded at first start", "directory": str(directory)},
                )
    except OperationalError as exc:
        log.warning("database unavailable at start; policies load on first use: %s", exc.orig)
        return
    log.info("policy set loaded", extra={"policy_set_hash": engine.policy_set_hash})


def _bearer(request: Request) -> None:
    """The bearer-token check of the large-body routes, run before their body is read."""
    current_principal(request)


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
        app.state.audit_log = AuditLog(
            witness_quorum=settings.audit.witness_quorum, log_id=settings.audit.log_id
        )
        app.state.tree_head_signer = TreeHeadSigner.load_or_create(settings.audit_head_key_file())
        app.state.policy_context = PolicyContext(
            model_catalogue=catalogue_keys(),
            member_organisations=frozenset(settings.policy.member_organisations),
            directory=settings.policy_directory(),
        )
        _seed_policies(app, settings)
        link = connect_superlink(settings)
        app.state.supernode_registry = (
            FlwrSuperNodeRegistry(link)
            if link is not None and settings.federation.register_supernodes
            else None
        )
        app.state.run_manager = None
        app.state.serverapp_token = None
        if link is not None:
            app.state.serverapp_token = (
                load_token(settings.federation.serverapp_token_file)
                if settings.federation.serverapp_token_file is not None
                else load_or_create_token(settings.serverapp_token_file())
            )
            app.state.run_manager = build_run_manager(
                settings,
                link,
                app.state.sessionmaker,
                app.state.audit_log,
                app.state.policy_context,
            )
            if settings.federation.resume_on_start:
                app.state.run_manager.start_keeper()
        log.info(
            "consortium server ready",
            extra={"identity": settings.identity.mode, "database": engine.dialect.name},
        )
        try:
            yield
        finally:
            if app.state.run_manager is not None:
                app.state.run_manager.shutdown()
            pending = refused_sign_ins(app).flush()
            if pending is not None:  # the last window's counted refusals
                record_refusal_summary(app, pending)
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
        larger_limits=[
            LargerLimit(KEY_RELAY_PATH, settings.api.max_key_body_bytes, _bearer),
            LargerLimit(MODEL_UPLOAD_PATH, settings.api.max_key_body_bytes, _bearer),
            LargerLimit(CHECKPOINT_PATH, settings.api.max_key_body_bytes, require_serverapp),
        ],
    )
    install_error_handlers(app)
    for router in (
        health_router,
        identity_router,
        sites_router,
        datasets_router,
        studies_router,
        federation_router,
        policy_router,
        budgets_router,
        audit_router,
        reports_router,
        release_router,
        internal_router,
    ):
        app.include_router(router)
    install_openapi(app)
    return app
