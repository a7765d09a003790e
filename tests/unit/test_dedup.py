"""Deduplication strategies (tracking.dedup): keys and fingerprints, without a database."""

from __future__ import annotations

import pytest

from tracking import KeyFields
from tracking.dedup import Custom, PayloadHash


@pytest.mark.parametrize("blank", ["", " ", "   ", "\t", "\n \r"])
def test_key_fields_refuse_a_blank_value(blank):
    strategy = KeyFields("request_id")
    for method in (strategy.fingerprint, strategy.business_key):
        with pytest.raises(ValueError, match="'request_id'.*must not be blank"):
            method({"request_id": blank, "customer": "C1"})


def test_key_fields_name_every_blank_field():
    strategy = KeyFields("customer", "request_id", "date")
    with pytest.raises(ValueError) as info:
        strategy.fingerprint({"customer": "C1", "request_id": "", "date": " "})
    assert "'request_id'" in str(info.value) and "'date'" in str(info.value)
    assert "'customer'" not in str(info.value)


def test_key_fields_accept_non_string_and_padded_values():
    strategy = KeyFields("request_id")
    assert strategy.business_key({"request_id": 0}) == "0"
    assert strategy.business_key({"request_id": 42}) == "42"
    assert strategy.business_key({"request_id": " R1 "}) == " R1 "
    assert strategy.fingerprint({"request_id": 1}) != strategy.fingerprint({"request_id": "1"})


def test_key_fields_still_refuse_missing_and_null():
    strategy = KeyFields("request_id")
    for payload in ({}, {"request_id": None}):
        with pytest.raises(ValueError, match="lacks dedup key field"):
            strategy.fingerprint(payload)


@pytest.mark.parametrize("blank", ["", " ", "\t\n"])
def test_custom_refuses_a_blank_key(blank):
    strategy = Custom(lambda p: blank)
    for method in (strategy.fingerprint, strategy.business_key):
        with pytest.raises(ValueError, match="non-blank string"):
            method({"customer": "C1"})


def test_custom_refuses_a_non_string_key_and_accepts_a_real_one():
    with pytest.raises(ValueError, match="non-blank string"):
        Custom(lambda p: 7).fingerprint({})
    strategy = Custom(lambda p: f"{p['customer']}:{p['date']}")
    assert strategy.business_key({"customer": "C1", "date": "2026-01-05"}) == "C1:2026-01-05"


def test_payload_hash_has_no_key_to_be_blank():
    assert PayloadHash().business_key({"request_id": ""})  # the whole payload is the key


def test_fingerprints_stay_what_earlier_versions_stored():
    """Deduplication compares new fingerprints with stored ones: the canonical JSON they
    hash (sorted keys, no spaces, ASCII escapes) must never change."""
    import hashlib

    def sha(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()

    assert KeyFields("request_id").fingerprint({"request_id": "FE-1", "x": 1}) == sha('["FE-1"]')
    assert KeyFields("b", "a").fingerprint({"a": 2, "b": "é"}) == sha('["\\u00e9",2]')
    payload = {"b": [1.5, None, True], "a": {"z": "x", "y": 0}}
    assert PayloadHash().fingerprint(payload) == sha(
        '{"a":{"y":0,"z":"x"},"b":[1.5,null,true]}')
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        PayloadHash().fingerprint({"a": float("nan")})
