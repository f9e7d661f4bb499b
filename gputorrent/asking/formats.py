"""Output formats a requester can ask for, as the llama.cpp grammar (GBNF) that enforces them.

The grammar travels in ``wire.Params.grammar``: the serving peer constrains its own sampling,
so a format costs no retries, and a spot check runs under the same grammar (like with like).
The conversion is llama-cpp-python's own (``llama_grammar``), so the swarm and a local
llama.cpp agree on what a schema allows.
"""

from __future__ import annotations

import json
from typing import Any


def json_grammar(schema: dict[str, Any] | str | None = None) -> str:
    """GBNF for any JSON object (``schema`` None: JSON mode), or for values valid under the
    JSON Schema ``schema``. ``ValueError`` for a schema it cannot express."""
    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

    if schema is None:
        return JSON_GBNF
    text = schema if isinstance(schema, str) else json.dumps(schema)
    try:
        return json_schema_to_gbnf(text)
    except Exception as exc:  # its errors are of every kind; the caller gets one
        raise ValueError(f"this JSON schema cannot be turned into a grammar: {exc}") from exc
