"""`Param`: the one description of a value a caller sets — a manifest key, a model option, a query
parameter: its type, range, default and help.

Everything else about such a value is read from it: its parsing (`parse` for JSON values,
`parse_text` for query strings and command-line text), its JSON schema in `/openapi.json`
(`schema`), its CLI option's help (`cli_help`), and the check of SECURITY.md's limit table. A value
it refuses raises `ParamError`, which says what is wrong without naming the value's context: each
caller wraps it in its own error (`InvalidManifest` naming the manifest key, `BadRequest` naming
the query parameter or the model option).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

__all__ = ["Param", "ParamError", "fields_params", "param_field"]

Kind = Literal["integer", "number", "string", "boolean", "array", "object"]
T = TypeVar("T")

_INTEGER_TEXT = re.compile(r"[+-]?[0-9]{1,19}")
_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no")


class ParamError(ValueError):
    """A value a `Param` refuses. `problem` completes a sentence that starts with the value's
    name ("must be between 1 and 4096, got 0"); `kind` is `type`, `range` or `choice`."""

    def __init__(self, kind: str, problem: str, value: object) -> None:
        super().__init__(problem)
        self.kind, self.problem, self.value = kind, problem, value


@dataclass(frozen=True)
class Param:
    """One value a caller sets. `minimum`/`maximum` bound numbers (inclusive); `choices` lists
    the strings a string may be; `nullable`: JSON null stands for the default. `unit` ends the
    help where the value has one (`MiB`, `ms`)."""

    name: str
    kind: Kind
    help: str
    default: Any = None
    minimum: int | float | None = None
    maximum: int | float | None = None
    choices: tuple[str, ...] = ()
    nullable: bool = False
    items: Kind | None = None  # the element kind of an array, the value kind of an object
    example: Any = None

    # -- parsing -------------------------------------------------------------------------------
    def parse(self, value: object) -> Any:
        """`value` as JSON gave it, checked. Raises `ParamError`."""
        if value is None and self.nullable:
            return None
        if self.kind == "integer":
            if isinstance(value, float) and value.is_integer():
                value = int(value)  # JSON encoders may write 16 as 16.0
            if type(value) is not int:  # bool is an int, and not a count
                raise self._type_error(value)
            return self._in_range(value)
        if self.kind == "number":
            if type(value) not in (int, float):
                raise self._type_error(value)
            assert isinstance(value, int | float)
            return self._in_range(self._finite(float(value)))
        if self.kind == "boolean":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in (*_TRUE, *_FALSE):
                return value.lower() in _TRUE
            raise self._type_error(value)
        if self.kind == "string":
            if not isinstance(value, str):
                raise self._type_error(value)
            return self._choice(value)
        raise TypeError(f"{self.name}: a {self.kind} has a parser of its own")

    def parse_text(self, raw: str) -> Any:
        """`raw` as a query string or a command line gave it, checked. A bare flag (`?async`) is
        true. Raises `ParamError`."""
        if self.kind == "integer":
            text = raw.strip()
            if not _INTEGER_TEXT.fullmatch(text):
                raise self._type_error(raw)
            return self._in_range(int(text))
        if self.kind == "number":
            try:
                number = float(raw)
            except ValueError:
                raise self._type_error(raw) from None
            return self._in_range(self._finite(number))
        if self.kind == "boolean":
            return True if raw == "" else self.parse(raw)
        if self.kind == "string":
            return self._choice(raw)
        raise TypeError(f"{self.name}: a {self.kind} has a parser of its own")

    def _type_error(self, value: object) -> ParamError:
        what = {
            "integer": "an integer",
            "number": "a number",
            "boolean": "true or false (1 or 0)",
            "string": "a string",
        }[self.kind]
        if self.nullable:
            what += " or null"
        return ParamError("type", f"must be {what}, got {value!r:.40}", value)

    def _finite(self, value: float) -> float:
        if not math.isfinite(value):
            raise ParamError("type", f"must be a finite number, got {value!r}", value)
        return value

    def _in_range(self, value: T) -> T:
        lo, hi = self.minimum, self.maximum
        assert isinstance(value, int | float)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ParamError("range", f"must be between {_num(lo)} and {_num(hi)}, got {value}", value)
        return value

    def _choice(self, value: str) -> str:
        if self.choices and value not in self.choices:
            raise ParamError("choice", f"must be one of {', '.join(self.choices)}, got {value!r:.40}", value)
        return value

    # -- descriptions --------------------------------------------------------------------------
    def schema(self) -> dict[str, Any]:
        """The value's JSON schema (OpenAPI 3.1)."""
        schema: dict[str, Any] = {"type": [self.kind, "null"] if self.nullable else self.kind}
        if self.kind == "array":
            schema["items"] = {"type": self.items or "string"}
        elif self.kind == "object":
            schema["additionalProperties"] = {"type": self.items or "string"}
        if self.choices:
            schema["enum"] = [*self.choices, *([None] if self.nullable else [])]
            del schema["type"]
        if self.minimum is not None:
            schema["minimum"] = self.minimum
        if self.maximum is not None:
            schema["maximum"] = self.maximum
        if self.default is not None:
            schema["default"] = list(self.default) if isinstance(self.default, tuple) else self.default
        schema["description"] = self.help
        return schema

    def cli_help(self) -> str:
        """The help of the value's command-line option: its help, range and default."""
        parts = [self.help]
        if self.minimum is not None or self.maximum is not None:
            parts.append(f"{_num(self.minimum)}..{_num(self.maximum)}")
        if self.default is not None and self.default != ():
            parts.append(f"default {self.default}")
        return "; ".join(parts) + "."


def param_field(default: T, kind: Kind, help: str, **description: Any) -> T:
    """A dataclass field with `default`, described by a `Param` (kept in the field's metadata under
    "param"; `fields_params` gives it the field's name)."""
    param = Param("", kind, help, default, **description)
    return field(default=default, metadata={"param": param})


def fields_params(cls: type) -> dict[str, Param]:
    """The `Param` of every field of dataclass `cls` made with `param_field`, by name."""
    return {
        f.name: dataclasses.replace(f.metadata["param"], name=f.name)
        for f in dataclasses.fields(cls)
        if "param" in f.metadata
    }


def _num(value: int | float | None) -> str:
    if value is None:
        return "any"
    return str(int(value)) if float(value).is_integer() else str(value)
