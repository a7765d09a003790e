"""The error envelope, request ids, logs, and the API key."""


from __future__ import annotations

import json
import uuid as uuid_lib
from typing import Any

from fastapi.testclient import TestClient

from tests.api.helpers import (
    P,
    assert_error,
    fake_runner,
    submit,
    tx_count,
)
from tracking.api import create_app
from tracking.api.logs import JsonFormatter, TextFormatter

# -- envelope, request id, logs --------------------------------------------------------------


def test_unknown_route_and_wrong_method_have_the_envelope(client):
    assert_error(client.get("/nothing/here"), 404, "NOT_FOUND")
    assert_error(client.delete("/transactions"), 405, "METHOD_NOT_ALLOWED")


def test_unexpected_exception_is_500_envelope_with_request_id(client, monkeypatch, api_logs):

    def explode(uuid: str) -> None:
        raise RuntimeError("internal detail /etc/secret")

    monkeypatch.setattr(client.app.state.service, "get", explode)
    r = client.get(f"/transactions/{uuid_lib.uuid4()}", headers={"X-Request-ID": "boom-1"})
    body = assert_error(r, 500, "INTERNAL_ERROR")
    assert body["request_id"] == "boom-1" and r.headers["x-request-id"] == "boom-1"
    assert "secret" not in r.text
    logged = [rec for rec in api_logs if rec.request_id == "boom-1"]
    assert any(rec.exc_info for rec in logged)  # the traceback is in the log
    assert any(rec.getMessage() == "request" and rec.status == 500 for rec in logged)


def test_request_id_is_echoed_when_safe_and_replaced_otherwise(client):
    r = client.get("/processes", headers={"X-Request-ID": "abc-123_x.y"})
    assert r.headers["x-request-id"] == "abc-123_x.y"
    for unsafe in ("a" * 129, "with space", "new\\nline", "é"):
        r = client.get("/processes", headers={"X-Request-ID": unsafe.encode("utf-8")})
        assert r.headers["x-request-id"] != unsafe
        uuid_lib.UUID(r.headers["x-request-id"], version=4)
    # On errors too, in the header and the body.
    r = client.get("/nope", headers={"X-Request-ID": "err-1"})
    assert r.headers["x-request-id"] == "err-1" and r.json()["request_id"] == "err-1"


def test_every_log_line_of_a_request_carries_its_id(client, api_logs):
    submit(client)
    r = client.post("/transactions", json={"process": P, "payload": {"request_id": "L"}},
                    headers={"X-Request-ID": "req-42"})
    assert r.status_code == 201
    mine = [rec for rec in api_logs if getattr(rec, "request_id", None) == "req-42"]
    assert {rec.getMessage() for rec in mine} == {"transition", "request"}
    access = next(rec for rec in mine if rec.getMessage() == "request")
    assert (access.method, access.path, access.status) == ("POST", "/transactions", 201)
    assert access.duration_ms >= 0
    text = TextFormatter().format(access)
    assert "request_id=req-42 request method=POST path=/transactions status=201" in text
    line = json.loads(JsonFormatter().format(access))
    assert line["request_id"] == "req-42" and line["status"] == 201
    assert line["message"] == "request" and "duration_ms" in line and "ts" in line


def test_json_logs_setting_switches_the_format(make_client):
    make_client(log_json=True)
    from tracking.api import logs

    assert logs._listener is not None
    assert all(isinstance(h.formatter, JsonFormatter) for h in logs._listener.handlers)
    make_client(log_json=False)
    assert all(isinstance(h.formatter, TextFormatter) for h in logs._listener.handlers)


# -- auth -------------------------------------------------------------------------------------


def test_writes_need_the_api_key_when_one_is_set(make_client, tracker):
    client = make_client(api_key="s3cret")
    body = {"process": P, "payload": {"request_id": "K"}}
    assert_error(client.post("/transactions", json=body), 401, "UNAUTHORIZED")
    assert_error(
        client.post("/transactions", json=body, headers={"X-API-Key": "wrong"}),
        401, "UNAUTHORIZED",
    )
    assert_error(
        client.post("/transactions", json=body, headers={"X-API-Key": "s3crét".encode()}),
        401, "UNAUTHORIZED",
    )
    assert tx_count(tracker) == 0
    ok = client.post("/transactions", json=body, headers={"X-API-Key": "s3cret"})
    assert ok.status_code == 201
    uuid = ok.json()["uuid"]
    assert_error(client.post(f"/transactions/{uuid}/cancel"), 401, "UNAUTHORIZED")
    assert client.get(f"/transactions/{uuid}").status_code == 200  # reads stay open
    assert client.get("/reports/summary").status_code == 200


def test_reads_need_the_key_when_configured(make_client):
    client = make_client(api_key="s3cret", api_key_for_reads=True)
    assert_error(client.get("/transactions"), 401, "UNAUTHORIZED")
    assert_error(client.get("/reports/summary"), 401, "UNAUTHORIZED")
    assert client.get("/transactions", headers={"X-API-Key": "s3cret"}).status_code == 200
    assert client.get("/health").status_code == 200  # probes and docs stay open
    assert client.get("/openapi.json").status_code == 200


def test_openapi_marks_the_operations_that_need_the_key(make_client):
    spec = make_client(api_key="s3cret").get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["ApiKey"]["name"] == "X-API-Key"
    assert spec["paths"]["/transactions"]["post"]["security"] == [{"ApiKey": []}]
    assert "security" not in spec["paths"]["/transactions"]["get"]
    assert "security" not in spec["paths"]["/health"]["get"]


def _secured(spec: dict[str, Any]) -> dict[str, bool]:
    """``"METHOD path" -> whether the operation declares the ApiKey scheme``."""
    return {
        f"{method.upper()} {path}": operation.get("security") == [{"ApiKey": []}]
        for path, operations in spec["paths"].items()
        for method, operation in operations.items()
    }


def test_openapi_declares_the_api_key_header_scheme_on_the_writes(make_client):
    """The scheme is FastAPI's APIKeyHeader: on every write; on reads only when they need it."""
    spec = make_client(api_key="s3cret").get("/openapi.json").json()
    scheme = spec["components"]["securitySchemes"]["ApiKey"]
    assert (scheme["type"], scheme["in"], scheme["name"]) == ("apiKey", "header", "X-API-Key")
    secured = _secured(spec)
    assert len(secured) == 15
    assert {op for op, needs in secured.items() if needs} == {
        "POST /transactions", "POST /transactions/{uuid}/process",
        "POST /transactions/{uuid}/cancel", "POST /transactions/{uuid}/requeue",
        "POST /transactions/{uuid}/defer",
    }

    spec = make_client(api_key="s3cret", api_key_for_reads=True).get("/openapi.json").json()
    assert {op for op, needs in _secured(spec).items() if not needs} == {"GET /health"}

    spec = make_client().get("/openapi.json").json()  # no key: nothing to declare
    assert "securitySchemes" not in spec.get("components", {})
    assert not any(_secured(spec).values())


def test_the_key_is_checked_before_the_body_is_validated(make_client, tracker):
    client = make_client(api_key="s3cret")
    missing = assert_error(client.post("/transactions", json={"payload": 1}), 401, "UNAUTHORIZED")
    assert missing["error"]["message"] == "X-API-Key header required"
    wrong = client.post("/transactions", json={"process": "NOPE", "payload": {}},
                        headers={"X-API-Key": "s3cre"})
    assert assert_error(wrong, 401, "UNAUTHORIZED")["error"]["message"] == (
        "missing or wrong X-API-Key header"
    )
    assert wrong.headers["www-authenticate"] == "ApiKey"
    assert_error(client.post("/transactions/nope/requeue", json={"reason": 1}), 401,
                 "UNAUTHORIZED")
    assert tx_count(tracker) == 0


def test_settings_read_at_startup_decide_which_routes_need_the_key(
    tracker, db_url, monkeypatch
):
    """create_app() without settings (uvicorn --factory tracking.api:create_app) wires the
    key at startup, and again at a later startup whose settings change it."""
    monkeypatch.setenv("TRACKING_DATABASE_URL", db_url)
    monkeypatch.setenv("TRACKING_API_KEY", "s3cret")
    monkeypatch.setenv("TRACKING_API_KEY_FOR_READS", "false")
    app = create_app(tracker=tracker, process_runner=fake_runner(tracker))
    body = {"process": P, "payload": {"request_id": "AT-START"}}
    with TestClient(app, raise_server_exceptions=False) as client:
        assert_error(client.post("/transactions", json=body), 401, "UNAUTHORIZED")
        assert client.get("/transactions").status_code == 200
        assert not _secured(client.get("/openapi.json").json())["GET /transactions"]
    monkeypatch.setenv("TRACKING_API_KEY_FOR_READS", "true")
    with TestClient(app, raise_server_exceptions=False) as client:
        assert_error(client.get("/transactions"), 401, "UNAUTHORIZED")
        assert client.get("/health").status_code == 200
        assert _secured(client.get("/openapi.json").json())["GET /transactions"]
        ok = client.post("/transactions", json=body, headers={"X-API-Key": "s3cret"})
        assert ok.status_code == 201
    assert tx_count(tracker) == 1


def test_openapi_lists_every_endpoint_and_the_process_codes(client):
    spec = client.get("/openapi.json").json()
    assert set(spec["paths"]) == {
        "/health", "/processes", "/transactions", "/transactions/{uuid}",
        "/transactions/{uuid}/process", "/transactions/{uuid}/cancel",
        "/transactions/{uuid}/requeue", "/transactions/{uuid}/defer", "/reports/summary",
        "/reports/stages", "/reports/errors", "/reports/overdue", "/reports/sla", "/purges",
    }
    process = spec["components"]["schemas"]["TransactionIn"]["properties"]["process"]
    assert process["examples"] == [P]
