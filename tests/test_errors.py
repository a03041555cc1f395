"""Tests of `wasminfer.errors`: every class has a code of its own, and crosses every boundary (the
wire form, an HTTP answer of the gateway) as itself."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

import pytest

from wasminfer import errors
from wasminfer.errors import (
    ERRORS,
    Conflict,
    FunctionNotFound,
    GuestRejected,
    InvalidManifest,
    InvalidName,
    ManifestLimit,
    MemoryLimitExceeded,
    MemoryQuotaExceeded,
    ModelVersionNotFound,
    Timeout,
    TooManyRequests,
    WasminferError,
    error_from_dict,
    error_from_http,
)
from wasminfer.gateway.errors import error_response
from wasminfer.manifest import Manifest


def _error_classes() -> list[type[WasminferError]]:
    """Every `WasminferError` subclass defined in `wasminfer.errors`, found by walking the tree (not
    from the registry under test)."""
    found: list[type[WasminferError]] = []
    stack: list[type[WasminferError]] = [WasminferError]
    while stack:
        cls = stack.pop()
        if cls.__module__ == errors.__name__ and cls not in found:
            found.append(cls)
        stack.extend(cls.__subclasses__())
    return found


# The classes whose constructor takes more than a message, built the way their raise sites build them.
_BUILT: dict[type[WasminferError], Callable[[], WasminferError]] = {
    TooManyRequests: lambda: TooManyRequests("function 'f': 3 requests in flight", retry_after_s=2.5),
    MemoryQuotaExceeded: lambda: MemoryQuotaExceeded("tenant 't' holds 64 of its 64 MiB", retry_after_s=2.5),
    GuestRejected: lambda: GuestRejected(418, "no coffee here"),
    FunctionNotFound: lambda: FunctionNotFound("f", "3"),
    ModelVersionNotFound: lambda: ModelVersionNotFound("m", 9),
    InvalidName: lambda: InvalidName("function", "Bad Name"),
    MemoryLimitExceeded: lambda: MemoryLimitExceeded.exceeded("f", "ran out of memory", 16, ": oom"),
}


def _example(cls: type[WasminferError]) -> WasminferError:
    return _BUILT[cls]() if cls in _BUILT else cls(f"{cls.__name__} happened")


ALL = _error_classes()


def test_the_walk_finds_the_whole_hierarchy() -> None:
    names = {cls.__name__ for cls in ALL}
    assert len(ALL) >= 36
    # the classes that lived outside errors.py once
    assert {"ModelVersionNotFound", "InvalidDigest", "BlobNotFound", "NotDelivered"} <= names
    assert {"LostWithIdempotentRequest", "WasminferError", "Timeout", "GuestRejected"} <= names


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_every_class_has_a_code_of_its_own_in_the_registry(cls: type[WasminferError]) -> None:
    assert "code" in vars(cls), f"{cls.__name__} declares no code of its own"
    assert ERRORS[cls.code] is cls


def test_the_registry_holds_only_classes_of_errors_py() -> None:
    assert sorted(ERRORS) == sorted(cls.code for cls in ALL)
    assert len(set(ERRORS.values())) == len(ALL)


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_every_class_round_trips_through_its_wire_form(cls: type[WasminferError]) -> None:
    err = _example(cls)
    wire = json.loads(json.dumps(err.to_dict()))  # as the worker and the jobs store carry it
    back = error_from_dict(wire)
    assert type(back) is cls
    assert (back.code, back.status, back.message) == (err.code, err.status, err.message)
    assert back.retry_after_s == err.retry_after_s
    assert back.to_dict() == err.to_dict()


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_every_class_round_trips_through_the_gateways_http_answer(cls: type[WasminferError]) -> None:
    err = _example(cls)
    response = error_response(err)
    assert json.loads(response.body) == {"error": {"code": err.code, "message": err.message}}
    back = error_from_http(response.status_code, bytes(response.body), response.headers.get("retry-after"))
    assert type(back) is cls
    assert (back.code, back.status, back.message) == (err.code, err.status, err.message)
    if err.retry_after_s is None:
        assert "retry-after" not in response.headers and back.retry_after_s is None
    else:  # whole seconds on HTTP, rounded up
        assert response.headers["retry-after"] == "3" and back.retry_after_s == 3.0


def test_the_wire_form_and_the_http_headers() -> None:
    busy = TooManyRequests("busy", retry_after_s=0.2)
    assert busy.to_dict() == {
        "code": "too_many_requests",
        "message": "busy",
        "status": 429,
        "retry_after_s": 0.2,
    }
    assert busy.http_headers() == {"Retry-After": "1"}
    assert FunctionNotFound("f").to_dict() == {
        "code": "function_not_found",
        "message": "function 'f' does not exist",
        "status": 404,
    }
    assert errors.Unauthorized("no key").http_headers() == {"WWW-Authenticate": 'Bearer realm="wasminfer"'}
    assert Conflict("x").http_headers() == {}


def test_a_code_this_side_does_not_know_keeps_its_code_and_status() -> None:
    back = error_from_dict({"code": "brand_new", "message": "m", "status": 409})
    assert type(back) is Conflict and (back.code, back.status, back.message) == ("brand_new", 409, "m")
    odd = error_from_dict({"code": "teapot", "message": "short and stout", "status": 418})
    assert type(odd) is WasminferError and (odd.code, odd.status) == ("teapot", 418)
    bare = error_from_dict({})
    assert type(bare) is WasminferError and (bare.code, bare.status, bare.message) == ("internal", 500, "")


def test_a_too_many_requests_without_retry_after_waits_one_second() -> None:
    body = json.dumps({"error": {"code": "too_many_requests", "message": "busy"}}).encode()
    assert error_from_http(429, body).retry_after_s == 1.0
    assert error_from_http(429, body, "not-a-number").retry_after_s == 1.0
    assert error_from_http(429, body, b"7").retry_after_s == 7.0


def test_a_body_that_is_not_an_error_quotes_itself() -> None:
    err = error_from_http(502, b"<html>bad gateway</html>")
    assert type(err) is WasminferError and err.status == 502
    assert err.message == "HTTP 502: <html>bad gateway</html>"


def test_limit_errors_are_built_from_the_key_and_its_value() -> None:
    err = MemoryLimitExceeded.exceeded("f", "ran out of memory", 16, ": MemoryError")
    assert err.message == (
        "function 'f' ran out of memory (its memory limit of 16 MiB, manifest key 'memory_mb'): MemoryError"
    )
    assert Timeout.exceeded("g", "ran past its timeout", 200).message == (
        "function 'g' ran past its timeout (its timeout of 200 ms, manifest key 'timeout_ms')"
    )
    assert InvalidManifest.out_of_range("memory_mb", 0, 1, 4096).message == (
        "manifest key 'memory_mb' must be between 1 and 4096, got 0"
    )


def test_every_limit_names_an_integer_key_of_the_manifest() -> None:
    limits = [cls for cls in ALL if issubclass(cls, ManifestLimit)]
    assert len(limits) == 6
    fields = {f.name: f for f in dataclasses.fields(Manifest)}
    for cls in limits:
        assert fields[cls.limit_key].type == "int", cls.__name__
        assert "{}" in cls.limit_text
