"""``GET /purges``: the purge audit trail over HTTP (a read: the API key only when reads
need it), and the retention in ``GET /processes``."""

from __future__ import annotations

from datetime import timedelta

from tests.api.helpers import P, assert_error
from tracking import ExecutionResult
from tracking.retention import Archive
from tracking.store.retention import Target


def test_purges_lists_the_audit_trail(tracker, clock, make_client, tmp_path):
    uuid, _ = tracker.start_or_resume(P, {"request_id": "FE-1"})
    tracker.complete_stage(uuid, "A", ExecutionResult(10, "blocked"))
    clock.advance(100 * 86_400)
    target = Target(P, timedelta(days=90), clock.now - timedelta(days=90))
    with Archive(tmp_path / "a.jsonl") as archive:
        tracker.purge([target], archive, actor="ops", archive_path=str(archive.path),
                      archive_format="jsonl")
    client = make_client()
    body = client.get("/purges").json()
    (row,) = body["purges"]
    assert (row["process_code"], row["transactions"], row["stages"], row["events"]) == (
        P, 1, 4, 2)
    assert row["archive_path"].endswith("a.jsonl") and row["actor"] == "ops"
    assert row["cutoff"].endswith(("+00:00", "Z")) and row["finished_at"] is not None
    assert client.get("/purges", params={"process": P}).json() == body
    assert_error(client.get("/purges", params={"process": "NOPE"}), 422, "VALIDATION_ERROR")
    assert client.get("/processes").json()["processes"][0]["retention_seconds"] is None


def test_purges_needs_the_key_when_reads_do(make_client):
    client = make_client(api_key="s3cret", api_key_for_reads=True)
    assert client.get("/purges").status_code == 401
    ok = client.get("/purges", headers={"X-API-Key": "s3cret"})
    assert ok.status_code == 200 and ok.json() == {"purges": []}
