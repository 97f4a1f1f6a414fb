"""Concurrent appends: no entry lost, indices dense, every index proven."""

from __future__ import annotations

import multiprocessing
import threading

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from concord_protocol.audit.merkle import inclusion_proof, root_hash, verify_inclusion
from consortium_server.audit.log import AuditLog, load_leaf_hashes
from consortium_server.db.session import make_engine, make_sessionmaker

from .conftest import make_entry

WORKERS = 4
PER_WORKER = 50


def _append_many(factory: sessionmaker[Session], worker: int, errors: list[BaseException]) -> None:
    log = AuditLog()
    try:
        for n in range(PER_WORKER):
            with factory() as session:
                log.append(make_entry(worker * 1000 + n), session=session)
                session.commit()
    except BaseException as exc:  # pragma: no cover - reported by the test
        errors.append(exc)


def _process_worker(url: str, worker: int) -> None:
    engine = make_engine(url)
    try:
        errors: list[BaseException] = []
        _append_many(make_sessionmaker(engine), worker, errors)
        if errors:
            raise errors[0]
    finally:
        engine.dispose()


def _assert_complete(factory: sessionmaker[Session]) -> None:
    log = AuditLog()
    with factory() as session:
        leaves = load_leaf_hashes(session)  # raises if any index is missing
        assert len(leaves) == WORKERS * PER_WORKER
        seen = {log.get_entry(i, session=session).entry.details["n"] for i in range(len(leaves))}
        # One spot check through the service, then every index against the same root.
        proof = log.prove_inclusion(len(leaves) - 1, session=session)
    expected = {w * 1000 + n for w in range(WORKERS) for n in range(PER_WORKER)}
    assert seen == expected
    root = root_hash(leaves)
    assert proof.root == root
    for index, leaf in enumerate(leaves):
        verify_inclusion(leaf, index, len(leaves), inclusion_proof(leaves, index), root)


def test_concurrent_appends_from_threads(db_engine: Engine) -> None:
    factory = make_sessionmaker(db_engine)
    errors: list[BaseException] = []
    threads = [
        threading.Thread(target=_append_many, args=(factory, w, errors)) for w in range(WORKERS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    _assert_complete(factory)


@pytest.mark.parametrize("db_backend", [pytest.param("postgres", marks=pytest.mark.postgres)])
def test_concurrent_appends_from_processes_on_postgres(db_url: str) -> None:
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=_process_worker, args=(db_url, w)) for w in range(WORKERS)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [p.exitcode for p in processes] == [0] * WORKERS
    engine = make_engine(db_url)
    try:
        _assert_complete(make_sessionmaker(engine))
    finally:
        engine.dispose()
