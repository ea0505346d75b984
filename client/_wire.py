"""Conversions between friendly Python values and the quota.v1 wire types.

Enums travel with their prefix (`MESSAGE_KIND_CAMPAIGN`); callers write and read the
short name (`"CAMPAIGN"`). Timestamps are aware datetimes in UTC, durations timedeltas,
decimal strings `Decimal`.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, Protocol, TypeVar

from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.descriptor import EnumDescriptor
from google.protobuf.message import Message

from ._errors import InvalidArgument

EnumArg = str | int
"""An enum value as its short name ("CAMPAIGN"), its wire name or its protobuf number."""

M = TypeVar("M", bound=Message)


class ProtoEnum(Hashable, Protocol):
    """A generated enum class (`quota_pb2.Channel`, ...): its descriptor is all the
    conversions read, from the enum's metaclass."""

    @property
    def DESCRIPTOR(self) -> EnumDescriptor: ...


TimestampArg = datetime | timestamp_pb2.Timestamp
DurationArg = timedelta | duration_pb2.Duration


def _prefix(descriptor: EnumDescriptor) -> str:
    return descriptor.values_by_number[0].name.removesuffix("UNSPECIFIED")


def enum_value(enum: ProtoEnum, value: EnumArg, field: str) -> int:
    """The wire number of `value`; an int passes through for the sidecar to judge."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidArgument(f"{field}: expected a {enum.DESCRIPTOR.name} name or number, got {value!r}")
    if isinstance(value, int):
        return value
    prefix = _prefix(enum.DESCRIPTOR)
    name = value.strip().upper().replace("-", "_")
    for candidate in (name, prefix + name):
        found = enum.DESCRIPTOR.values_by_name.get(candidate)
        if found is not None:
            return found.number
    allowed = ", ".join(short_names(enum))
    raise InvalidArgument(f"{field}: unknown {enum.DESCRIPTOR.name} {value!r} (one of {allowed})")


def enum_values(enum: ProtoEnum, values: Iterable[EnumArg], field: str) -> list[int]:
    if isinstance(values, (str, int)):
        values = [values]
    return [enum_value(enum, value, field) for value in values]


def enum_name(enum: ProtoEnum, number: int) -> str:
    """The short name of a wire number; a number this client does not know stays a number."""
    found = enum.DESCRIPTOR.values_by_number.get(number)
    if found is None:
        return str(number)
    return found.name.removeprefix(_prefix(enum.DESCRIPTOR))


def short_names(enum: ProtoEnum) -> list[str]:
    """The short names of an enum's values, the `*_UNSPECIFIED` zero value left out."""
    return [enum_name(enum, value.number) for value in enum.DESCRIPTOR.values if value.number != 0]


def to_timestamp(value: TimestampArg, field: str) -> timestamp_pb2.Timestamp:
    if isinstance(value, timestamp_pb2.Timestamp):
        return value
    if not isinstance(value, datetime):
        raise InvalidArgument(f"{field}: expected a datetime, got {value!r}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidArgument(f"{field}: the datetime must be timezone-aware (e.g. tzinfo=timezone.utc)")
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def from_timestamp(stamp: timestamp_pb2.Timestamp) -> datetime:
    return stamp.ToDatetime(tzinfo=UTC)


def to_duration(value: DurationArg, field: str) -> duration_pb2.Duration:
    if isinstance(value, duration_pb2.Duration):
        return value
    if not isinstance(value, timedelta):
        raise InvalidArgument(f"{field}: expected a timedelta, got {value!r}")
    duration = duration_pb2.Duration()
    duration.FromTimedelta(value)
    return duration


def from_duration(duration: duration_pb2.Duration) -> timedelta:
    return duration.ToTimedelta()


def to_decimal_string(value: Decimal | str | int, field: str) -> str:
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        raise InvalidArgument(f"{field}: {value!r} is not a decimal number") from None
    if not number.is_finite():
        raise InvalidArgument(f"{field}: {value!r} is not a decimal number")
    return format(number, "f")


def from_decimal_string(text: str) -> Decimal | None:
    """The decimal a wire string carries; an empty string (field unset) gives None."""
    if not text:
        return None
    try:
        return Decimal(text)
    except InvalidOperation:
        return None


def id_list(values: str | Iterable[str], field: str) -> list[str]:
    """A list of ids; one bare string is one id, not a sequence of characters."""
    if isinstance(values, str):
        return [values]
    ids = list(values)
    for value in ids:
        if not isinstance(value, str):
            raise InvalidArgument(f"{field}: ids are strings, got {value!r}")
    return ids


def message(cls: type[M], within: str = "", /, **fields: Any) -> M:
    """`cls(**fields)`, where text without a UTF-8 form (a lone surrogate, as
    `os.fsdecode` makes of undecodable bytes) is the caller's InvalidArgument naming its
    field (prefixed with `within`); protobuf's UnicodeEncodeError names none."""
    try:
        return cls(**fields)
    except UnicodeEncodeError:
        for name, value in fields.items():
            texts = [(name, value)] if isinstance(value, str) else _listed(name, value)
            for field, text in texts:
                try:
                    text.encode()
                except UnicodeEncodeError as exc:
                    raise InvalidArgument(
                        f"{within}{field}: the text has no UTF-8 form ({exc.reason}, at character {exc.start})"
                    ) from None
        raise


def _listed(name: str, value: object) -> list[tuple[str, str]]:
    if not isinstance(value, (list, tuple)):
        return []
    return [(f"{name}[{i}]", item) for i, item in enumerate(value) if isinstance(item, str)]
