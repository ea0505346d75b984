"""The generated quota.v1 descriptors against the published contract in docs/api.md.

api.md names the services, RPCs, messages, fields and enum values that users write
their code against; these tests read those names (and the types the document states
for them) out of api.md itself and look each one up in
`quota_sidecar.api.v1.quota_pb2.DESCRIPTOR`, so neither the protos nor the
stubs can drift from the document. Extra fields, RPCs and values are allowed.

api.md is the repository's own `docs/api.md`; `QUOTA_API_DOC` points at another
copy. A missing document is a failure, not a skip.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

from quota_sidecar.api.v1 import quota_pb2

API_DOC_ENV = "QUOTA_API_DOC"
REPO_API_DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"
PACKAGE = "quota.v1"

SCALAR_TYPES = {
    FieldDescriptor.TYPE_STRING: "string",
    FieldDescriptor.TYPE_BOOL: "bool",
    FieldDescriptor.TYPE_DOUBLE: "double",
    FieldDescriptor.TYPE_FLOAT: "float",
    FieldDescriptor.TYPE_INT32: "int32",
    FieldDescriptor.TYPE_INT64: "int64",
    FieldDescriptor.TYPE_UINT32: "uint32",
    FieldDescriptor.TYPE_UINT64: "uint64",
    FieldDescriptor.TYPE_BYTES: "bytes",
}

# `CheckSend(CheckSendRequest) → CheckSendResponse`, or with inline fields:
# `PutPlan(PutPlanRequest{tenant_id, plan: Plan}) → PutPlanResponse{plan, usage}`.
SIGNATURE = re.compile(r"^(\w+)\((\w+)(?:\{([^{}]*)\})?\)\s*→\s*(\w+)(?:\{([^{}]*)\})?$")
INLINE_FIELD = re.compile(r"^(\w+)(?:\s*:\s*(repeated\s+)?([\w.]+))?$")
# A backticked field name and the parenthesis right after it: `usage` (Usage: ...).
DOC_FIELD = re.compile(r"`([a-z][a-z0-9_]*)`(?:\s*\(([^()]*)\))?")
# SourceRule{`source` (ContactSource), `policy` (SourcePolicy)}
BRACED_MESSAGE = re.compile(r"([A-Z]\w*)\{([^{}]*)\}")
# (repeated CheckSendResult: `contact_id`, `decision`, ...)
LISTED_MESSAGE = re.compile(r"\(repeated ([A-Z]\w*): ([^()]*`[^()]*)\)")
TYPE_WORD = re.compile(r"^(optional\s+|repeated\b[\s:]*)?([A-Za-z][\w.]*)?")


@dataclass
class FieldSpec:
    """What api.md says about one field: its name and, where it says so, type, repeated, optional."""

    name: str
    type: str | None = None
    repeated: bool = False
    optional: bool = False


@dataclass
class RpcSpec:
    service: str
    name: str
    request: str
    response: str


@dataclass
class Contract:
    """The names api.md publishes."""

    services: dict[str, list[RpcSpec]] = field(default_factory=dict)
    messages: dict[str, list[FieldSpec]] = field(default_factory=dict)
    enums: dict[str, list[str]] = field(default_factory=dict)
    wire_values: list[str] = field(default_factory=list)

    def add_fields(self, message: str, specs: list[FieldSpec]) -> None:
        self.messages.setdefault(message, []).extend(specs)


def api_doc_path() -> Path:
    explicit = os.environ.get(API_DOC_ENV)
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            pytest.fail(f"{API_DOC_ENV}={explicit} does not name a file; the contract cannot be checked")
        return path
    if not REPO_API_DOC.is_file():
        pytest.fail(f"api.md not found at {REPO_API_DOC}; the contract cannot be checked")
    return REPO_API_DOC


@functools.cache
def _parse(path: Path) -> Contract:
    return parse_contract(path.read_text(encoding="utf-8"))


def contract() -> Contract:
    return _parse(api_doc_path())


def sections(text: str) -> list[tuple[str, str]]:
    """(heading, body) for every markdown heading, the body running to the next heading."""
    found: list[tuple[str, str]] = []
    heading, body = "", []
    for line in text.splitlines():
        if line.startswith("#"):
            found.append((heading, "\n".join(body)))
            heading, body = line.strip(), []
        else:
            body.append(line)
    found.append((heading, "\n".join(body)))
    return found


def bullets(body: str) -> list[str]:
    """Top-level `- ` list items, with their indented continuation lines joined."""
    items: list[list[str]] = []
    open_item = False
    for line in body.splitlines():
        if line.startswith("- "):
            items.append([line[2:].strip()])
            open_item = True
        elif open_item and line.startswith((" ", "\t")) and line.strip():
            items[-1].append(line.strip())
        else:
            open_item = False
    return [" ".join(item) for item in items]


def parse_type(annotation: str) -> tuple[str | None, bool, bool]:
    """(type word, repeated, optional) from the parenthesis after a field, e.g. `repeated string`."""
    match = TYPE_WORD.match(annotation.strip())
    assert match is not None
    modifier, word = (match.group(1) or "").strip(), match.group(2)
    return word, modifier.startswith("repeated"), modifier == "optional"


def parse_fields(text: str, contract: Contract) -> list[FieldSpec]:
    """The backticked field names of a field list, registering nested message lists on the way."""

    def braced(match: re.Match[str]) -> str:
        contract.add_fields(match.group(1), parse_fields(match.group(2), contract))
        return match.group(1)

    def listed(match: re.Match[str]) -> str:
        contract.add_fields(match.group(1), parse_fields(match.group(2), contract))
        return f"(repeated {match.group(1)})"

    text = BRACED_MESSAGE.sub(braced, text)
    text = LISTED_MESSAGE.sub(listed, text)
    specs = []
    for match in DOC_FIELD.finditer(text):
        word, repeated, optional = parse_type(match.group(2) or "")
        specs.append(FieldSpec(match.group(1), word, repeated, optional))
    return specs


def parse_inline_fields(text: str | None) -> list[FieldSpec]:
    specs = []
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        match = INLINE_FIELD.match(item)
        assert match is not None, f"cannot read the inline field {item!r}"
        specs.append(FieldSpec(match.group(1), match.group(3), bool(match.group(2))))
    return specs


def first_paragraph(body: str) -> str:
    return body.strip().split("\n\n")[0]


def parse_contract(text: str) -> Contract:
    found = Contract()
    for heading, body in sections(text):
        if service := re.fullmatch(r"## service (\w+)\b.*", heading):
            rpcs = found.services.setdefault(service.group(1), [])
            for row in body.splitlines():
                cell = re.match(r"\|\s*`([^`]+)`\s*\|", row)
                if cell is None:
                    continue
                signature = SIGNATURE.match(cell.group(1).strip())
                assert signature is not None, f"cannot read the RPC signature {cell.group(1)!r}"
                name, request, request_fields, response, response_fields = signature.groups()
                rpcs.append(RpcSpec(service.group(1), name, request, response))
                found.add_fields(request, parse_inline_fields(request_fields))
                found.add_fields(response, parse_inline_fields(response_fields))
            for item in bullets(body):
                if message := re.match(r"`([A-Z]\w*)`:\s*(.*)", item):
                    found.add_fields(message.group(1), parse_fields(message.group(2), found))
        elif pair := re.fullmatch(r"### (\w+)Request / Response", heading):
            parts = re.split(r"\b(Request|Response):", first_paragraph(body))
            for role, part in zip(parts[1::2], parts[2::2], strict=False):
                found.add_fields(pair.group(1) + role, parse_fields(part, found))
        elif single := re.fullmatch(r"### (?:message )?([A-Z]\w*)", heading):
            found.add_fields(single.group(1), parse_fields(first_paragraph(body), found))
        elif heading == "## Enums":
            for item in bullets(body):
                enum = re.match(r"`([A-Z]\w*)`:\s*(.*)", item)
                assert enum is not None, f"cannot read the enum line {item!r}"
                values = enum.group(2)
                while re.search(r"\([^()]*\)", values):
                    values = re.sub(r"\([^()]*\)", "", values)
                found.enums[enum.group(1)] = re.findall(r"\b[A-Z][A-Z0-9_]*\b", values)
            found.wire_values = re.findall(r"`([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+)`", body)
    return found


def enum_prefix(name: str) -> str:
    """MessageKind -> MESSAGE_KIND, as buf's ENUM_VALUE_PREFIX rule asks."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).upper()


def resolve_type(word: str) -> str | None:
    """The full proto type name a type word of api.md stands for; None when it is prose."""
    if word in SCALAR_TYPES.values():
        return word
    if word.endswith("s") and word[:-1] in SCALAR_TYPES.values():
        return word[:-1]
    if not re.match(r"^[A-Z][a-z]|^google\.protobuf\.", word):
        return None
    pool = quota_pb2.DESCRIPTOR.pool
    for candidate in (word, word[:-1] if word.endswith("s") else None):
        if candidate is None:
            continue
        for full_name in (f"{PACKAGE}.{candidate}", f"google.protobuf.{candidate}", candidate):
            for find in (pool.FindMessageTypeByName, pool.FindEnumTypeByName):
                try:
                    return find(full_name).full_name
                except KeyError:
                    pass
    return f"<undefined {word}>"


def field_type(descriptor: FieldDescriptor) -> str:
    if descriptor.message_type is not None:
        return descriptor.message_type.full_name
    if descriptor.enum_type is not None:
        return descriptor.enum_type.full_name
    return SCALAR_TYPES.get(descriptor.type, f"<type {descriptor.type}>")


def message(name: str) -> Descriptor | None:
    return quota_pb2.DESCRIPTOR.message_types_by_name.get(name)


def enum(name: str) -> EnumDescriptor | None:
    return quota_pb2.DESCRIPTOR.enum_types_by_name.get(name)


def report(problems: list[str]) -> str:
    return "the generated quota.v1 descriptors break docs/api.md:\n  " + "\n  ".join(problems)


def test_the_document_is_read_whole() -> None:
    """Guards the parser: a reshaped api.md must not silently leave names unchecked."""
    parsed = contract()
    assert set(parsed.services) == {"QuotaService", "QuotaAdminService"}
    assert sum(len(rpcs) for rpcs in parsed.services.values()) >= 11
    assert len(parsed.enums) >= 11 and all(parsed.enums.values())
    assert len(parsed.messages) >= 27
    empty = sorted(name for name, specs in parsed.messages.items() if not specs)
    rpc_messages = {n for rpcs in parsed.services.values() for r in rpcs for n in (r.request, r.response)}
    assert not set(empty) - rpc_messages, f"messages read with no fields: {empty}"
    for name in ("Plan", "Usage", "ContactState", "ActiveContact", "InvoiceLine", "SourceRule", "CheckSendResult"):
        assert parsed.messages.get(name), f"api.md's fields of {name} were not read"
    assert "source_rules" in {spec.name for spec in parsed.messages["Plan"]}
    assert "cycle_start" not in {spec.name for spec in parsed.messages["Plan"]}, "Plan read past its own section"


def test_file_is_the_quota_v1_package() -> None:
    assert quota_pb2.DESCRIPTOR.package == PACKAGE


def test_every_rpc_of_the_document_exists_with_its_messages() -> None:
    problems = []
    for service_name, rpcs in contract().services.items():
        service = quota_pb2.DESCRIPTOR.services_by_name.get(service_name)
        if service is None:
            problems.append(f"service {PACKAGE}.{service_name} is missing")
            continue
        for rpc in rpcs:
            method = service.methods_by_name.get(rpc.name)
            if method is None:
                problems.append(f"{service_name}.{rpc.name} is missing")
                continue
            if method.input_type.full_name != f"{PACKAGE}.{rpc.request}":
                problems.append(f"{service_name}.{rpc.name} takes {method.input_type.full_name}, not {rpc.request}")
            if method.output_type.full_name != f"{PACKAGE}.{rpc.response}":
                problems.append(f"{service_name}.{rpc.name} returns {method.output_type.full_name}, not {rpc.response}")
            if method.client_streaming or method.server_streaming:
                problems.append(f"{service_name}.{rpc.name} streams; api.md publishes a unary call")
    assert not problems, report(problems)


def test_every_message_of_the_document_has_its_fields() -> None:
    problems = []
    for message_name, specs in sorted(contract().messages.items()):
        descriptor = message(message_name)
        if descriptor is None:
            problems.append(f"message {PACKAGE}.{message_name} is missing")
            continue
        for spec in specs:
            found = descriptor.fields_by_name.get(spec.name)
            where = f"{message_name}.{spec.name}"
            if found is None:
                problems.append(f"{where} is missing")
                continue
            expected = resolve_type(spec.type) if spec.type else None
            if expected is not None and expected != field_type(found):
                problems.append(f"{where} is {field_type(found)}; api.md says {spec.type}")
            if spec.repeated and not found.is_repeated:
                problems.append(f"{where} is not repeated; api.md says it is")
            if spec.optional and not found.has_presence:
                problems.append(f"{where} has no presence (`optional`); api.md says it is optional")
    assert not problems, report(problems)


def test_every_enum_value_of_the_document_exists_with_its_prefix() -> None:
    problems = []
    for enum_name, values in sorted(contract().enums.items()):
        descriptor = enum(enum_name)
        if descriptor is None:
            problems.append(f"enum {PACKAGE}.{enum_name} is missing")
            continue
        prefix = enum_prefix(enum_name)
        for value in values:
            if f"{prefix}_{value}" not in descriptor.values_by_name:
                problems.append(f"{enum_name} has no value {prefix}_{value}")
    assert not problems, report(problems)


def test_every_enum_zero_value_is_unspecified() -> None:
    problems = []
    for enum_name in sorted(contract().enums):
        descriptor = enum(enum_name)
        if descriptor is None:
            problems.append(f"enum {PACKAGE}.{enum_name} is missing")
            continue
        zero = descriptor.values_by_number.get(0)
        expected = f"{enum_prefix(enum_name)}_UNSPECIFIED"
        if zero is None or zero.name != expected:
            problems.append(f"{enum_name}'s zero value is {zero.name if zero else 'missing'}, not {expected}")
    assert not problems, report(problems)


def test_wire_value_examples_of_the_document_exist() -> None:
    parsed = contract()
    assert parsed.wire_values, "api.md's Enums section gives no wire-name examples to check"
    defined = {value for e in quota_pb2.DESCRIPTOR.enum_types_by_name.values() for value in e.values_by_name}
    missing = [value for value in parsed.wire_values if value not in defined]
    assert not missing, report([f"no enum value {value}" for value in missing])
