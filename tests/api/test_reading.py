"""Reading one transaction and listing them (filters, cursors)."""


from __future__ import annotations

import uuid as uuid_lib
from datetime import timedelta
from typing import Any

import pytest

from tests.api.helpers import (
    STAGES,
    P,
    assert_error,
    seed,
    submit,
)
from tests.api_processes import orders
from tracking.api.schemas import encode_cursor

# -- reading one, listing ----------------------------------------------------------------------


def test_get_transaction_has_stages_and_events(client):
    uuid = submit(client).json()["uuid"]
    r = client.get(f"/transactions/{uuid}")
    assert r.status_code == 200
    body = r.json()
    assert body["uuid"] == uuid and body["state"] == "PENDING"
    assert [(s["platform"], s["stage"], s["state"]) for s in body["stages"]] == [
        (p, s, "PENDING") for p, s in STAGES
    ]
    assert [e["kind"] for e in body["events"]] == ["CREATED"]


@pytest.mark.parametrize("uuid", [str(uuid_lib.uuid4()), "not-a-uuid", "x" * 300, "%00"],
                         ids=["unknown-uuid", "not-a-uuid", "long", "nul"])
def test_unknown_transaction_is_404(client, uuid):
    for method, path in (
        ("GET", f"/transactions/{uuid}"),
        ("POST", f"/transactions/{uuid}/process"),
        ("POST", f"/transactions/{uuid}/cancel"),
        ("POST", f"/transactions/{uuid}/requeue"),
    ):
        assert_error(client.request(method, path), 404, "TRANSACTION_NOT_FOUND")


def test_listing_is_newest_first_and_pages_with_a_stable_cursor(client, tracker, clock):
    uuids = seed(client, tracker, clock, 7)
    first = client.get("/transactions", params={"limit": 3}).json()
    assert [t["uuid"] for t in first["items"]] == uuids[::-1][:3]
    assert first["next_cursor"]
    # Rows added between pages do not shift the next pages.
    seed(client, tracker, clock, 2, prefix="LATE")
    second = client.get("/transactions", params={"limit": 3, "cursor": first["next_cursor"]})
    third = client.get("/transactions", params={"limit": 3, "cursor": second.json()["next_cursor"]})
    assert [t["uuid"] for t in second.json()["items"]] == uuids[::-1][3:6]
    assert [t["uuid"] for t in third.json()["items"]] == uuids[::-1][6:]
    assert third.json()["next_cursor"] is None


def test_listing_pages_through_rows_created_in_the_same_instant(client, tracker):
    # The fake clock stands still: every row has the same created_at; uuid breaks the tie.
    created = {submit(client, f"S-{i}").json()["uuid"] for i in range(5)}
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get("/transactions", params=params).json()
        seen += [t["uuid"] for t in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == sorted(created, reverse=True)


def test_listing_filters(client, tracker, clock, make_client):
    tracker.register(orders)
    a, b = seed(client, tracker, clock, 2)
    start = clock.now
    clock.advance(10)
    c = client.post(
        "/transactions", json={"process": "ORDERS", "payload": {"n": 1}, "source": "shop"}
    ).json()["uuid"]
    client.post(f"/transactions/{a}/cancel")

    def uuids(**params: Any) -> list[str]:
        r = client.get("/transactions", params=params)
        assert r.status_code == 200, r.text
        return [t["uuid"] for t in r.json()["items"]]

    assert uuids(process=P) == [b, a]
    assert uuids(process="ORDERS") == [c]
    assert uuids(state="CANCELLED") == [a]
    assert uuids(source="shop") == [c]
    assert uuids(source="crm", state="PENDING") == [b]
    assert uuids(created_from=(start + timedelta(seconds=5)).isoformat()) == [c]
    assert uuids(created_to=start.isoformat()) == [b, a]


@pytest.mark.parametrize(
    "params",
    [
        {"limit": 0},
        {"limit": 501},
        {"limit": "many"},
        {"state": "DONE"},
        {"process": "NOPE"},
        {"cursor": "garbage"},
        {"cursor": "eyJhIjoxfQ"},  # base64 of {"a":1}
        {"created_from": "yesterday"},
        {"created_from": "2026-01-06T00:00:00Z", "created_to": "2026-01-05T00:00:00Z"},
        {"created_to": "0001-01-01T00:00:00+05:00"},  # before year 1 in UTC
        {"source": "a\u0000b"},
    ],
)
def test_listing_rejects_invalid_filters_with_422(client, params):
    assert_error(client.get("/transactions", params=params), 422, "VALIDATION_ERROR")


def test_cursor_from_another_listing_position_still_works(client, tracker, clock):
    uuids = seed(client, tracker, clock, 3)
    tx = tracker.get_transaction(uuids[1])
    page = client.get(
        "/transactions", params={"cursor": encode_cursor(tx.created_at, tx.uuid)}
    ).json()
    assert [t["uuid"] for t in page["items"]] == [uuids[0]]
