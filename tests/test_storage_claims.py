"""Exclusive create on every store (the arbiter of the claim protocol, launcher.ledger): N
workers race for one claim and exactly one wins, 50 rounds on each of S3, GCS and Azure (real
emulators, tests/stores.py), with the store's own conditional create and no check-then-write.
The figures go to test-artifacts/claim-race-<store>.json and the test's output."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from launcher import storage
from launcher.errors import StorageError

pytestmark = [pytest.mark.integration]
ROUNDS, WORKERS = 50, 4
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def _race(uri: str) -> list[int]:
    """WORKERS threads released together call create_exclusive(uri); the indexes that won."""
    barrier, won, errors = threading.Barrier(WORKERS), [], []

    def worker(i: int) -> None:
        barrier.wait()
        try:
            if storage.create_exclusive(uri, f"worker-{i}".encode()):
                won.append(i)
        except Exception as exc:  # reported below with the round
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return won


def test_exactly_one_worker_wins_each_claim(store, capsys):
    winners_per_round = []
    for r in range(ROUNDS):
        uri = f"{store['uri']}/claims/round-{r:03d}"
        won = _race(uri)
        winners_per_round.append(len(won))
        assert len(won) == 1, f"round {r}: workers {won} all won {uri}"
        assert storage.read_bytes(uri) == f"worker-{won[0]}".encode()  # the winner's bytes, not a later writer's
    figures = {"store": store["scheme"], "rounds": ROUNDS, "workers": WORKERS,
               "winners_per_round": sorted(set(winners_per_round)), "rounds_with_one_winner": winners_per_round.count(1)}
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / f"claim-race-{store['scheme']}.json").write_text(json.dumps(figures) + "\n")
    with capsys.disabled():
        print(f"\nclaim race: {json.dumps(figures)}")


def test_the_store_arbitrates_not_a_prior_check(store):
    """The create is one conditional request: no existence check before it that two workers
    could both pass."""
    uri = f"{store['uri']}/claims/one"
    assert storage.create_exclusive(uri, b"first") is True
    store["proxy"].requests.clear()
    assert storage.create_exclusive(uri, b"second") is False
    assert storage.read_bytes(uri) == b"first"
    first = store["proxy"].requests[0]
    assert first[0] in ("PUT", "POST"), store["proxy"].requests
    if store["scheme"] == "gs":
        assert "ifGenerationMatch=0" in first[1], first


def test_a_fleet_is_refused_on_a_store_without_exclusive_create():
    with pytest.raises(StorageError, match=r"memory:// has no exclusive create.*3 workers"):
        storage.require_exclusive_create("memory://out/job", 3)
    storage.require_exclusive_create("memory://out/job", 1)  # one worker never races
    for uri in ("s3://b/o", "gs://b/o", "az://c/o", "/shared/out"):
        storage.require_exclusive_create(uri, 64)
