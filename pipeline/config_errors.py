"""Validation errors of any config model as one line each, naming the field and the value.

Imports only pydantic: the serving runtime (serving.config) uses it without the training side.
"""

from __future__ import annotations

from pydantic import ValidationError


def format_validation_error(err: ValidationError) -> list[str]:
    """One line per error: `field.path: message (got value)`."""
    out = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<config>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        # Section-level checks name their values in the message; a field error shows its own.
        value = e.get("input")
        shown = e["type"] != "missing" and not isinstance(value, dict) and loc != "<config>"
        got = f" (got {value!r})" if shown else ""
        out += [f"{loc}: {line}{got}" for line in msg.split("\n")]
    return out
