"""The one JSON form of the contract's messages that the product emits (the webhook body,
`quotactl --json`): protobuf's proto3 JSON mapping, as every language's protobuf library
prints and parses it.

Of the mapping's printer options two are taken: proto field names (`tenant_id`, which the
mapping lets a printer keep; parsers accept both spellings) and fields at their default
value printed, so a receiver finds every field of the message. 64-bit integers are JSON
numbers when a double holds them exactly (every count and sequence the sidecar reaches),
strings beyond: the mapping's parsers accept both, and `jq '.usage.sends > 100'` works.
The rest is the mapping as specified: enums by their full names, Timestamps and Durations
as RFC 3339 and `"1.5s"` strings, decimals as the strings the messages carry.
"""

from __future__ import annotations

import json
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message


def message_dict(message: Message) -> dict[str, Any]:
    """`message` in the proto3 JSON mapping, as JSON-ready Python values."""
    return json_format.MessageToDict(
        message,
        always_print_fields_with_no_presence=True,
        preserving_proto_field_name=True,
        unquote_int64_if_possible=True,
    )


def message_json(message: Message, *, indent: int | None = None) -> str:
    """`message` as a JSON document in the proto3 JSON mapping: one line unless `indent`."""
    separators = None if indent else (",", ":")
    return json.dumps(message_dict(message), indent=indent, separators=separators)
