"""The site's reply cache: a round asked again (a restarted run) is answered with the
reply already sent, so the site trains and spends privacy budget once per round."""

from __future__ import annotations

from pathlib import Path

from site_node.federation.replies import CachedReply, ReplyCache, global_digest


def test_the_reply_cache_answers_only_the_same_request(tmp_path: Path) -> None:
    cache = ReplyCache(tmp_path, "study-1", "ab" * 32)
    digest = global_digest([b"agg"], round_number=1, total_weight=300.0)
    cache.put(CachedReply(2, digest, (b"header", b"chunk"), {"num-examples": 120}))
    hit = cache.get(2, digest)
    assert hit is not None
    assert hit.blobs == (b"header", b"chunk")
    assert hit.metrics == {"num-examples": 120}
    assert cache.get(3, digest) is None
    assert cache.get(2, global_digest([b"other"], round_number=1, total_weight=300.0)) is None
    assert cache.get(2, global_digest([b"agg"], round_number=1, total_weight=301.0)) is None
    assert ReplyCache(tmp_path, "study-2", "ab" * 32).get(2, digest) is None
    assert cache.path.stat().st_mode & 0o777 == 0o600


def test_train_requests_of_a_study_wait_for_each_other(tmp_path: Path) -> None:
    """The lock is held across processes (a resumed run's ClientApp waits for the old one)."""
    import multiprocessing
    import time

    cache = ReplyCache(tmp_path, "study-1", "ab" * 32)
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()

    def hold() -> None:
        with ReplyCache(tmp_path, "study-1", "ab" * 32).exclusive():
            ready.set()
            time.sleep(1.0)
            (tmp_path / "first-done").touch()

    child = ctx.Process(target=hold)
    child.start()
    assert ready.wait(30)
    with cache.exclusive():
        assert (tmp_path / "first-done").exists()
    child.join(30)
    assert child.exitcode == 0


def test_an_unreadable_reply_cache_is_a_miss(tmp_path: Path) -> None:
    cache = ReplyCache(tmp_path, "study-1", "ab" * 32)
    digest = global_digest(None, round_number=0, total_weight=0.0)
    cache.put(CachedReply(1, digest, (b"x",), {}))
    cache.path.write_bytes(cache.path.read_bytes()[:-3])  # truncated
    assert cache.get(1, digest) is None
    cache.path.write_bytes(b"garbage")
    assert cache.get(1, digest) is None
