"""`wasminfer.params.Param`: one description of a value a caller sets, and what is read from it —
parsing (JSON values and text, each limit obeyed and violated), its JSON schema, its CLI help."""

from __future__ import annotations

from typing import Any

import pytest

from wasminfer.params import Param, ParamError

COUNT = Param("n", "integer", "lines", default=200, minimum=0, maximum=10_000)
RATE = Param("since", "number", "a Unix time")
FLAG = Param("async", "boolean", "run as a job")
STATUS = Param("status", "string", "a status", choices=("queued", "running"))
OPTION = Param("threads", "integer", "threads", default=1, minimum=0, maximum=64, nullable=True)


@pytest.mark.parametrize(
    ("param", "raw", "value"),
    [
        (COUNT, "0", 0), (COUNT, "10000", 10_000), (COUNT, " 7 ", 7), (COUNT, "+3", 3),
        (RATE, "1.5", 1.5), (RATE, "-2", -2.0),
        (FLAG, "", True), (FLAG, "1", True), (FLAG, "YES", True), (FLAG, "0", False), (FLAG, "false", False),
        (STATUS, "queued", "queued"),
    ],
)  # fmt: skip
def test_text_obeyed(param: Param, raw: str, value: Any) -> None:
    assert param.parse_text(raw) == value


@pytest.mark.parametrize(
    ("param", "raw", "kind", "problem"),
    [
        (COUNT, "10001", "range", "must be between 0 and 10000, got 10001"),
        (COUNT, "-1", "range", "must be between 0 and 10000, got -1"),
        (COUNT, "1_000", "type", "must be an integer, got '1_000'"),
        (COUNT, "1e3", "type", "must be an integer, got '1e3'"),
        (COUNT, "9" * 20, "type", "must be an integer, got '99999999999999999999'"),
        (RATE, "inf", "type", "must be a finite number, got inf"),
        (RATE, "x", "type", "must be a number, got 'x'"),
        (FLAG, "maybe", "type", "must be true or false (1 or 0), got 'maybe'"),
        (STATUS, "sleeping", "choice", "must be one of queued, running, got 'sleeping'"),
    ],
)
def test_text_violated(param: Param, raw: str, kind: str, problem: str) -> None:
    with pytest.raises(ParamError) as info:
        param.parse_text(raw)
    assert (info.value.kind, info.value.problem) == (kind, problem)


@pytest.mark.parametrize(
    ("param", "value", "parsed"),
    [(COUNT, 16, 16), (COUNT, 16.0, 16), (OPTION, None, None), (OPTION, 64, 64), (FLAG, True, True),
     (FLAG, "no", False), (RATE, 3, 3.0)],
)  # fmt: skip
def test_json_obeyed(param: Param, value: object, parsed: Any) -> None:
    assert param.parse(value) == parsed


@pytest.mark.parametrize(
    ("param", "value", "problem"),
    [
        (COUNT, True, "must be an integer, got True"),
        (COUNT, "16", "must be an integer, got '16'"),
        (COUNT, 16.5, "must be an integer, got 16.5"),
        (COUNT, None, "must be an integer, got None"),
        (OPTION, 65, "must be between 0 and 64, got 65"),
        (OPTION, [1], "must be an integer or null, got [1]"),
        (RATE, float("nan"), "must be a finite number, got nan"),
        (FLAG, 1, "must be true or false (1 or 0), got 1"),
    ],
)
def test_json_violated(param: Param, value: object, problem: str) -> None:
    with pytest.raises(ParamError) as info:
        param.parse(value)
    assert info.value.problem == problem


def test_schema_and_cli_help_come_from_the_description() -> None:
    assert COUNT.schema() == {
        "type": "integer", "minimum": 0, "maximum": 10_000, "default": 200, "description": "lines",
    }  # fmt: skip
    assert OPTION.schema()["type"] == ["integer", "null"]
    assert STATUS.schema() == {"enum": ["queued", "running"], "description": "a status"}
    assert COUNT.cli_help() == "lines; 0..10000; default 200."
    assert RATE.cli_help() == "a Unix time."
