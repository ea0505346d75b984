import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import field_mask_pb2 as _field_mask_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Channel(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHANNEL_UNSPECIFIED: _ClassVar[Channel]
    CHANNEL_EMAIL: _ClassVar[Channel]
    CHANNEL_WHATSAPP: _ClassVar[Channel]
    CHANNEL_SMS: _ClassVar[Channel]

class MessageKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MESSAGE_KIND_UNSPECIFIED: _ClassVar[MessageKind]
    MESSAGE_KIND_CAMPAIGN: _ClassVar[MessageKind]
    MESSAGE_KIND_AUTOMATION: _ClassVar[MessageKind]
    MESSAGE_KIND_TRANSACTIONAL: _ClassVar[MessageKind]
    MESSAGE_KIND_ONE_TO_ONE: _ClassVar[MessageKind]

class BillingInterval(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BILLING_INTERVAL_UNSPECIFIED: _ClassVar[BillingInterval]
    BILLING_INTERVAL_MONTHLY: _ClassVar[BillingInterval]
    BILLING_INTERVAL_ANNUAL: _ClassVar[BillingInterval]

class Decision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECISION_UNSPECIFIED: _ClassVar[Decision]
    DECISION_ALLOW: _ClassVar[Decision]
    DECISION_DENY: _ClassVar[Decision]
    DECISION_DEFER: _ClassVar[Decision]
    DECISION_EXPIRED: _ClassVar[Decision]

class Reason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REASON_UNSPECIFIED: _ClassVar[Reason]
    REASON_OK: _ClassVar[Reason]
    REASON_ALREADY_ACTIVE: _ClassVar[Reason]
    REASON_NEW_CONTACT_COUNTED: _ClassVar[Reason]
    REASON_NOT_COUNTED: _ClassVar[Reason]
    REASON_CONTACT_LIMIT_REACHED: _ClassVar[Reason]
    REASON_SENDS_LIMIT_REACHED: _ClassVar[Reason]
    REASON_OVER_GRACE: _ClassVar[Reason]
    REASON_SOURCE_BLOCKED: _ClassVar[Reason]
    REASON_IMPORT_EXCEEDS_LIMIT: _ClassVar[Reason]
    REASON_NOT_MARKETING_CONTACT: _ClassVar[Reason]
    REASON_UNKNOWN_CONTACT: _ClassVar[Reason]
    REASON_QUEUED_TOO_LONG: _ClassVar[Reason]
    REASON_OVERAGE: _ClassVar[Reason]

class ContactSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONTACT_SOURCE_UNSPECIFIED: _ClassVar[ContactSource]
    CONTACT_SOURCE_API: _ClassVar[ContactSource]
    CONTACT_SOURCE_FORM: _ClassVar[ContactSource]
    CONTACT_SOURCE_IMPORT: _ClassVar[ContactSource]
    CONTACT_SOURCE_MANUAL: _ClassVar[ContactSource]

class SourcePolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SOURCE_POLICY_UNSPECIFIED: _ClassVar[SourcePolicy]
    SOURCE_POLICY_OVER_LIMIT_ALLOWED: _ClassVar[SourcePolicy]
    SOURCE_POLICY_REFUSE_IF_EXCEEDS: _ClassVar[SourcePolicy]
    SOURCE_POLICY_BLOCKED_AT_LIMIT: _ClassVar[SourcePolicy]

class ActivityKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACTIVITY_KIND_UNSPECIFIED: _ClassVar[ActivityKind]
    ACTIVITY_KIND_CONTACT_CREATED: _ClassVar[ActivityKind]
    ACTIVITY_KIND_STATUS_CHANGED: _ClassVar[ActivityKind]
    ACTIVITY_KIND_MESSAGE_SENT: _ClassVar[ActivityKind]
    ACTIVITY_KIND_NOTE_ADDED: _ClassVar[ActivityKind]
    ACTIVITY_KIND_PROPERTY_CHANGED: _ClassVar[ActivityKind]
    ACTIVITY_KIND_STATUS_RENAMED: _ClassVar[ActivityKind]
    ACTIVITY_KIND_CONTACT_DELETED: _ClassVar[ActivityKind]
    ACTIVITY_KIND_MARKETING_STATUS_SET: _ClassVar[ActivityKind]

class Metering(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    METERING_UNSPECIFIED: _ClassVar[Metering]
    METERING_HELD_CONTACTS: _ClassVar[Metering]
    METERING_CYCLE_ACTIVE: _ClassVar[Metering]

class Enforcement(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENFORCEMENT_UNSPECIFIED: _ClassVar[Enforcement]
    ENFORCEMENT_HARD: _ClassVar[Enforcement]
    ENFORCEMENT_GRACE: _ClassVar[Enforcement]
    ENFORCEMENT_OVERAGE: _ClassVar[Enforcement]

class UsageState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    USAGE_STATE_UNSPECIFIED: _ClassVar[UsageState]
    USAGE_STATE_OK: _ClassVar[UsageState]
    USAGE_STATE_WARNING: _ClassVar[UsageState]
    USAGE_STATE_AT_LIMIT: _ClassVar[UsageState]
    USAGE_STATE_IN_GRACE: _ClassVar[UsageState]
    USAGE_STATE_BLOCKED: _ClassVar[UsageState]
    USAGE_STATE_IN_OVERAGE: _ClassVar[UsageState]

class UsageEventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    USAGE_EVENT_TYPE_UNSPECIFIED: _ClassVar[UsageEventType]
    USAGE_EVENT_TYPE_THRESHOLD_CROSSED: _ClassVar[UsageEventType]
    USAGE_EVENT_TYPE_REMINDER: _ClassVar[UsageEventType]

class UsageFigure(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    USAGE_FIGURE_UNSPECIFIED: _ClassVar[UsageFigure]
    USAGE_FIGURE_CONTACTS: _ClassVar[UsageFigure]
    USAGE_FIGURE_SENDS: _ClassVar[UsageFigure]
CHANNEL_UNSPECIFIED: Channel
CHANNEL_EMAIL: Channel
CHANNEL_WHATSAPP: Channel
CHANNEL_SMS: Channel
MESSAGE_KIND_UNSPECIFIED: MessageKind
MESSAGE_KIND_CAMPAIGN: MessageKind
MESSAGE_KIND_AUTOMATION: MessageKind
MESSAGE_KIND_TRANSACTIONAL: MessageKind
MESSAGE_KIND_ONE_TO_ONE: MessageKind
BILLING_INTERVAL_UNSPECIFIED: BillingInterval
BILLING_INTERVAL_MONTHLY: BillingInterval
BILLING_INTERVAL_ANNUAL: BillingInterval
DECISION_UNSPECIFIED: Decision
DECISION_ALLOW: Decision
DECISION_DENY: Decision
DECISION_DEFER: Decision
DECISION_EXPIRED: Decision
REASON_UNSPECIFIED: Reason
REASON_OK: Reason
REASON_ALREADY_ACTIVE: Reason
REASON_NEW_CONTACT_COUNTED: Reason
REASON_NOT_COUNTED: Reason
REASON_CONTACT_LIMIT_REACHED: Reason
REASON_SENDS_LIMIT_REACHED: Reason
REASON_OVER_GRACE: Reason
REASON_SOURCE_BLOCKED: Reason
REASON_IMPORT_EXCEEDS_LIMIT: Reason
REASON_NOT_MARKETING_CONTACT: Reason
REASON_UNKNOWN_CONTACT: Reason
REASON_QUEUED_TOO_LONG: Reason
REASON_OVERAGE: Reason
CONTACT_SOURCE_UNSPECIFIED: ContactSource
CONTACT_SOURCE_API: ContactSource
CONTACT_SOURCE_FORM: ContactSource
CONTACT_SOURCE_IMPORT: ContactSource
CONTACT_SOURCE_MANUAL: ContactSource
SOURCE_POLICY_UNSPECIFIED: SourcePolicy
SOURCE_POLICY_OVER_LIMIT_ALLOWED: SourcePolicy
SOURCE_POLICY_REFUSE_IF_EXCEEDS: SourcePolicy
SOURCE_POLICY_BLOCKED_AT_LIMIT: SourcePolicy
ACTIVITY_KIND_UNSPECIFIED: ActivityKind
ACTIVITY_KIND_CONTACT_CREATED: ActivityKind
ACTIVITY_KIND_STATUS_CHANGED: ActivityKind
ACTIVITY_KIND_MESSAGE_SENT: ActivityKind
ACTIVITY_KIND_NOTE_ADDED: ActivityKind
ACTIVITY_KIND_PROPERTY_CHANGED: ActivityKind
ACTIVITY_KIND_STATUS_RENAMED: ActivityKind
ACTIVITY_KIND_CONTACT_DELETED: ActivityKind
ACTIVITY_KIND_MARKETING_STATUS_SET: ActivityKind
METERING_UNSPECIFIED: Metering
METERING_HELD_CONTACTS: Metering
METERING_CYCLE_ACTIVE: Metering
ENFORCEMENT_UNSPECIFIED: Enforcement
ENFORCEMENT_HARD: Enforcement
ENFORCEMENT_GRACE: Enforcement
ENFORCEMENT_OVERAGE: Enforcement
USAGE_STATE_UNSPECIFIED: UsageState
USAGE_STATE_OK: UsageState
USAGE_STATE_WARNING: UsageState
USAGE_STATE_AT_LIMIT: UsageState
USAGE_STATE_IN_GRACE: UsageState
USAGE_STATE_BLOCKED: UsageState
USAGE_STATE_IN_OVERAGE: UsageState
USAGE_EVENT_TYPE_UNSPECIFIED: UsageEventType
USAGE_EVENT_TYPE_THRESHOLD_CROSSED: UsageEventType
USAGE_EVENT_TYPE_REMINDER: UsageEventType
USAGE_FIGURE_UNSPECIFIED: UsageFigure
USAGE_FIGURE_CONTACTS: UsageFigure
USAGE_FIGURE_SENDS: UsageFigure

class Usage(_message.Message):
    __slots__ = ("tenant_id", "cycle_start", "cycle_end", "active_contacts", "contact_limit", "usage_ratio", "sends", "sends_limit", "state", "overage_contacts", "overage_amount", "currency", "plan_name", "peak_contacts")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    CYCLE_START_FIELD_NUMBER: _ClassVar[int]
    CYCLE_END_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_CONTACTS_FIELD_NUMBER: _ClassVar[int]
    CONTACT_LIMIT_FIELD_NUMBER: _ClassVar[int]
    USAGE_RATIO_FIELD_NUMBER: _ClassVar[int]
    SENDS_FIELD_NUMBER: _ClassVar[int]
    SENDS_LIMIT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    OVERAGE_CONTACTS_FIELD_NUMBER: _ClassVar[int]
    OVERAGE_AMOUNT_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    PLAN_NAME_FIELD_NUMBER: _ClassVar[int]
    PEAK_CONTACTS_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    cycle_start: _timestamp_pb2.Timestamp
    cycle_end: _timestamp_pb2.Timestamp
    active_contacts: int
    contact_limit: int
    usage_ratio: float
    sends: int
    sends_limit: int
    state: UsageState
    overage_contacts: int
    overage_amount: str
    currency: str
    plan_name: str
    peak_contacts: int
    def __init__(self, tenant_id: _Optional[str] = ..., cycle_start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., cycle_end: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., active_contacts: _Optional[int] = ..., contact_limit: _Optional[int] = ..., usage_ratio: _Optional[float] = ..., sends: _Optional[int] = ..., sends_limit: _Optional[int] = ..., state: _Optional[_Union[UsageState, str]] = ..., overage_contacts: _Optional[int] = ..., overage_amount: _Optional[str] = ..., currency: _Optional[str] = ..., plan_name: _Optional[str] = ..., peak_contacts: _Optional[int] = ...) -> None: ...

class CheckSendRequest(_message.Message):
    __slots__ = ("tenant_id", "contact_id", "channel", "kind", "queued_since", "dry_run", "request_id")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    CONTACT_ID_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    QUEUED_SINCE_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    contact_id: str
    channel: Channel
    kind: MessageKind
    queued_since: _timestamp_pb2.Timestamp
    dry_run: bool
    request_id: str
    def __init__(self, tenant_id: _Optional[str] = ..., contact_id: _Optional[str] = ..., channel: _Optional[_Union[Channel, str]] = ..., kind: _Optional[_Union[MessageKind, str]] = ..., queued_since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., dry_run: _Optional[bool] = ..., request_id: _Optional[str] = ...) -> None: ...

class CheckSendResponse(_message.Message):
    __slots__ = ("decision", "reason", "newly_active", "usage", "retry_after")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    NEWLY_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_FIELD_NUMBER: _ClassVar[int]
    decision: Decision
    reason: Reason
    newly_active: bool
    usage: Usage
    retry_after: _duration_pb2.Duration
    def __init__(self, decision: _Optional[_Union[Decision, str]] = ..., reason: _Optional[_Union[Reason, str]] = ..., newly_active: _Optional[bool] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., retry_after: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class CheckSendBatchRequest(_message.Message):
    __slots__ = ("tenant_id", "channel", "kind", "contact_ids", "dry_run", "request_id")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CONTACT_IDS_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    channel: Channel
    kind: MessageKind
    contact_ids: _containers.RepeatedScalarFieldContainer[str]
    dry_run: bool
    request_id: str
    def __init__(self, tenant_id: _Optional[str] = ..., channel: _Optional[_Union[Channel, str]] = ..., kind: _Optional[_Union[MessageKind, str]] = ..., contact_ids: _Optional[_Iterable[str]] = ..., dry_run: _Optional[bool] = ..., request_id: _Optional[str] = ...) -> None: ...

class CheckSendResult(_message.Message):
    __slots__ = ("contact_id", "decision", "reason", "newly_active")
    CONTACT_ID_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    NEWLY_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    contact_id: str
    decision: Decision
    reason: Reason
    newly_active: bool
    def __init__(self, contact_id: _Optional[str] = ..., decision: _Optional[_Union[Decision, str]] = ..., reason: _Optional[_Union[Reason, str]] = ..., newly_active: _Optional[bool] = ...) -> None: ...

class CheckSendBatchResponse(_message.Message):
    __slots__ = ("results", "allowed", "denied", "newly_active", "usage")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    DENIED_FIELD_NUMBER: _ClassVar[int]
    NEWLY_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[CheckSendResult]
    allowed: int
    denied: int
    newly_active: int
    usage: Usage
    def __init__(self, results: _Optional[_Iterable[_Union[CheckSendResult, _Mapping]]] = ..., allowed: _Optional[int] = ..., denied: _Optional[int] = ..., newly_active: _Optional[int] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ...) -> None: ...

class CheckContactAddRequest(_message.Message):
    __slots__ = ("tenant_id", "source", "contact_ids", "dry_run", "marketing", "request_id")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    CONTACT_IDS_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    MARKETING_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    source: ContactSource
    contact_ids: _containers.RepeatedScalarFieldContainer[str]
    dry_run: bool
    marketing: bool
    request_id: str
    def __init__(self, tenant_id: _Optional[str] = ..., source: _Optional[_Union[ContactSource, str]] = ..., contact_ids: _Optional[_Iterable[str]] = ..., dry_run: _Optional[bool] = ..., marketing: _Optional[bool] = ..., request_id: _Optional[str] = ...) -> None: ...

class CheckContactAddResponse(_message.Message):
    __slots__ = ("decision", "reason", "added", "usage")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ADDED_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    decision: Decision
    reason: Reason
    added: int
    usage: Usage
    def __init__(self, decision: _Optional[_Union[Decision, str]] = ..., reason: _Optional[_Union[Reason, str]] = ..., added: _Optional[int] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ...) -> None: ...

class CheckEnrollRequest(_message.Message):
    __slots__ = ("tenant_id", "contact_id", "automation_id")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    CONTACT_ID_FIELD_NUMBER: _ClassVar[int]
    AUTOMATION_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    contact_id: str
    automation_id: str
    def __init__(self, tenant_id: _Optional[str] = ..., contact_id: _Optional[str] = ..., automation_id: _Optional[str] = ...) -> None: ...

class CheckEnrollResponse(_message.Message):
    __slots__ = ("decision", "reason", "usage")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    decision: Decision
    reason: Reason
    usage: Usage
    def __init__(self, decision: _Optional[_Union[Decision, str]] = ..., reason: _Optional[_Union[Reason, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ...) -> None: ...

class RecordActivityRequest(_message.Message):
    __slots__ = ("tenant_id", "kind", "contact_ids", "occurred_at", "marketing", "source_type", "source_id", "request_id")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CONTACT_IDS_FIELD_NUMBER: _ClassVar[int]
    OCCURRED_AT_FIELD_NUMBER: _ClassVar[int]
    MARKETING_FIELD_NUMBER: _ClassVar[int]
    SOURCE_TYPE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    kind: ActivityKind
    contact_ids: _containers.RepeatedScalarFieldContainer[str]
    occurred_at: _timestamp_pb2.Timestamp
    marketing: bool
    source_type: str
    source_id: str
    request_id: str
    def __init__(self, tenant_id: _Optional[str] = ..., kind: _Optional[_Union[ActivityKind, str]] = ..., contact_ids: _Optional[_Iterable[str]] = ..., occurred_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., marketing: _Optional[bool] = ..., source_type: _Optional[str] = ..., source_id: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class RecordActivityResponse(_message.Message):
    __slots__ = ("recorded", "newly_active", "usage")
    RECORDED_FIELD_NUMBER: _ClassVar[int]
    NEWLY_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    recorded: int
    newly_active: int
    usage: Usage
    def __init__(self, recorded: _Optional[int] = ..., newly_active: _Optional[int] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ...) -> None: ...

class GetUsageRequest(_message.Message):
    __slots__ = ("tenant_id", "cycle_start")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    CYCLE_START_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    cycle_start: _timestamp_pb2.Timestamp
    def __init__(self, tenant_id: _Optional[str] = ..., cycle_start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetUsageResponse(_message.Message):
    __slots__ = ("usage",)
    USAGE_FIELD_NUMBER: _ClassVar[int]
    usage: Usage
    def __init__(self, usage: _Optional[_Union[Usage, _Mapping]] = ...) -> None: ...

class UsageEvent(_message.Message):
    __slots__ = ("sequence", "event_id", "type", "figure", "tenant_id", "threshold", "occurred_at", "usage")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    FIGURE_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    OCCURRED_AT_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    event_id: str
    type: UsageEventType
    figure: UsageFigure
    tenant_id: str
    threshold: float
    occurred_at: _timestamp_pb2.Timestamp
    usage: Usage
    def __init__(self, sequence: _Optional[int] = ..., event_id: _Optional[str] = ..., type: _Optional[_Union[UsageEventType, str]] = ..., figure: _Optional[_Union[UsageFigure, str]] = ..., tenant_id: _Optional[str] = ..., threshold: _Optional[float] = ..., occurred_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ...) -> None: ...

class WatchUsageEventsRequest(_message.Message):
    __slots__ = ("tenant_id", "after_sequence", "backlog_only")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    BACKLOG_ONLY_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    after_sequence: int
    backlog_only: bool
    def __init__(self, tenant_id: _Optional[str] = ..., after_sequence: _Optional[int] = ..., backlog_only: _Optional[bool] = ...) -> None: ...

class WatchUsageEventsResponse(_message.Message):
    __slots__ = ("event",)
    EVENT_FIELD_NUMBER: _ClassVar[int]
    event: UsageEvent
    def __init__(self, event: _Optional[_Union[UsageEvent, _Mapping]] = ...) -> None: ...

class SourceRule(_message.Message):
    __slots__ = ("source", "policy")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    source: ContactSource
    policy: SourcePolicy
    def __init__(self, source: _Optional[_Union[ContactSource, str]] = ..., policy: _Optional[_Union[SourcePolicy, str]] = ...) -> None: ...

class Plan(_message.Message):
    __slots__ = ("plan_name", "metering", "enforcement", "contact_limit", "addon_contacts", "grace_percent", "sends_limit", "sends_per_contact", "overage_unit_price", "currency", "cycle_anchor", "billing_interval", "counted_kinds", "counted_activities", "source_rules", "max_queue", "notify_thresholds", "renotify_interval", "preset", "marketing_contacts_only", "given_fields")
    PLAN_NAME_FIELD_NUMBER: _ClassVar[int]
    METERING_FIELD_NUMBER: _ClassVar[int]
    ENFORCEMENT_FIELD_NUMBER: _ClassVar[int]
    CONTACT_LIMIT_FIELD_NUMBER: _ClassVar[int]
    ADDON_CONTACTS_FIELD_NUMBER: _ClassVar[int]
    GRACE_PERCENT_FIELD_NUMBER: _ClassVar[int]
    SENDS_LIMIT_FIELD_NUMBER: _ClassVar[int]
    SENDS_PER_CONTACT_FIELD_NUMBER: _ClassVar[int]
    OVERAGE_UNIT_PRICE_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    CYCLE_ANCHOR_FIELD_NUMBER: _ClassVar[int]
    BILLING_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    COUNTED_KINDS_FIELD_NUMBER: _ClassVar[int]
    COUNTED_ACTIVITIES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_RULES_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    NOTIFY_THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    RENOTIFY_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    MARKETING_CONTACTS_ONLY_FIELD_NUMBER: _ClassVar[int]
    GIVEN_FIELDS_FIELD_NUMBER: _ClassVar[int]
    plan_name: str
    metering: Metering
    enforcement: Enforcement
    contact_limit: int
    addon_contacts: int
    grace_percent: int
    sends_limit: int
    sends_per_contact: int
    overage_unit_price: str
    currency: str
    cycle_anchor: _timestamp_pb2.Timestamp
    billing_interval: BillingInterval
    counted_kinds: _containers.RepeatedScalarFieldContainer[MessageKind]
    counted_activities: _containers.RepeatedScalarFieldContainer[ActivityKind]
    source_rules: _containers.RepeatedCompositeFieldContainer[SourceRule]
    max_queue: _duration_pb2.Duration
    notify_thresholds: _containers.RepeatedScalarFieldContainer[float]
    renotify_interval: _duration_pb2.Duration
    preset: str
    marketing_contacts_only: bool
    given_fields: _field_mask_pb2.FieldMask
    def __init__(self, plan_name: _Optional[str] = ..., metering: _Optional[_Union[Metering, str]] = ..., enforcement: _Optional[_Union[Enforcement, str]] = ..., contact_limit: _Optional[int] = ..., addon_contacts: _Optional[int] = ..., grace_percent: _Optional[int] = ..., sends_limit: _Optional[int] = ..., sends_per_contact: _Optional[int] = ..., overage_unit_price: _Optional[str] = ..., currency: _Optional[str] = ..., cycle_anchor: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., billing_interval: _Optional[_Union[BillingInterval, str]] = ..., counted_kinds: _Optional[_Iterable[_Union[MessageKind, str]]] = ..., counted_activities: _Optional[_Iterable[_Union[ActivityKind, str]]] = ..., source_rules: _Optional[_Iterable[_Union[SourceRule, _Mapping]]] = ..., max_queue: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., notify_thresholds: _Optional[_Iterable[float]] = ..., renotify_interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., preset: _Optional[str] = ..., marketing_contacts_only: _Optional[bool] = ..., given_fields: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ...) -> None: ...

class PutPlanRequest(_message.Message):
    __slots__ = ("tenant_id", "plan")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    plan: Plan
    def __init__(self, tenant_id: _Optional[str] = ..., plan: _Optional[_Union[Plan, _Mapping]] = ...) -> None: ...

class PutPlanResponse(_message.Message):
    __slots__ = ("plan", "usage")
    PLAN_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    plan: Plan
    usage: Usage
    def __init__(self, plan: _Optional[_Union[Plan, _Mapping]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ...) -> None: ...

class GetPlanRequest(_message.Message):
    __slots__ = ("tenant_id",)
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    def __init__(self, tenant_id: _Optional[str] = ...) -> None: ...

class GetPlanResponse(_message.Message):
    __slots__ = ("plan",)
    PLAN_FIELD_NUMBER: _ClassVar[int]
    plan: Plan
    def __init__(self, plan: _Optional[_Union[Plan, _Mapping]] = ...) -> None: ...

class ContactState(_message.Message):
    __slots__ = ("tenant_id", "contact_id", "held", "active_this_cycle", "activated_at", "marketing", "marketing_until_next_update", "marketing_source_type", "marketing_source_id")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    CONTACT_ID_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_THIS_CYCLE_FIELD_NUMBER: _ClassVar[int]
    ACTIVATED_AT_FIELD_NUMBER: _ClassVar[int]
    MARKETING_FIELD_NUMBER: _ClassVar[int]
    MARKETING_UNTIL_NEXT_UPDATE_FIELD_NUMBER: _ClassVar[int]
    MARKETING_SOURCE_TYPE_FIELD_NUMBER: _ClassVar[int]
    MARKETING_SOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    contact_id: str
    held: bool
    active_this_cycle: bool
    activated_at: _timestamp_pb2.Timestamp
    marketing: bool
    marketing_until_next_update: bool
    marketing_source_type: str
    marketing_source_id: str
    def __init__(self, tenant_id: _Optional[str] = ..., contact_id: _Optional[str] = ..., held: _Optional[bool] = ..., active_this_cycle: _Optional[bool] = ..., activated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., marketing: _Optional[bool] = ..., marketing_until_next_update: _Optional[bool] = ..., marketing_source_type: _Optional[str] = ..., marketing_source_id: _Optional[str] = ...) -> None: ...

class GetContactRequest(_message.Message):
    __slots__ = ("tenant_id", "contact_id")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    CONTACT_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    contact_id: str
    def __init__(self, tenant_id: _Optional[str] = ..., contact_id: _Optional[str] = ...) -> None: ...

class GetContactResponse(_message.Message):
    __slots__ = ("contact",)
    CONTACT_FIELD_NUMBER: _ClassVar[int]
    contact: ContactState
    def __init__(self, contact: _Optional[_Union[ContactState, _Mapping]] = ...) -> None: ...

class ActiveContact(_message.Message):
    __slots__ = ("contact_id", "activated_at", "activity", "counted_until")
    CONTACT_ID_FIELD_NUMBER: _ClassVar[int]
    ACTIVATED_AT_FIELD_NUMBER: _ClassVar[int]
    ACTIVITY_FIELD_NUMBER: _ClassVar[int]
    COUNTED_UNTIL_FIELD_NUMBER: _ClassVar[int]
    contact_id: str
    activated_at: _timestamp_pb2.Timestamp
    activity: str
    counted_until: _timestamp_pb2.Timestamp
    def __init__(self, contact_id: _Optional[str] = ..., activated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., activity: _Optional[str] = ..., counted_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListActiveContactsRequest(_message.Message):
    __slots__ = ("tenant_id", "cycle_start", "page_size", "page_token")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    CYCLE_START_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    cycle_start: _timestamp_pb2.Timestamp
    page_size: int
    page_token: str
    def __init__(self, tenant_id: _Optional[str] = ..., cycle_start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListActiveContactsResponse(_message.Message):
    __slots__ = ("contacts", "next_page_token")
    CONTACTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    contacts: _containers.RepeatedCompositeFieldContainer[ActiveContact]
    next_page_token: str
    def __init__(self, contacts: _Optional[_Iterable[_Union[ActiveContact, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class InvoiceLine(_message.Message):
    __slots__ = ("description", "quantity", "unit_price", "amount", "currency")
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    UNIT_PRICE_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    description: str
    quantity: int
    unit_price: str
    amount: str
    currency: str
    def __init__(self, description: _Optional[str] = ..., quantity: _Optional[int] = ..., unit_price: _Optional[str] = ..., amount: _Optional[str] = ..., currency: _Optional[str] = ...) -> None: ...

class GetInvoiceRequest(_message.Message):
    __slots__ = ("tenant_id", "cycle_start")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    CYCLE_START_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    cycle_start: _timestamp_pb2.Timestamp
    def __init__(self, tenant_id: _Optional[str] = ..., cycle_start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetInvoiceResponse(_message.Message):
    __slots__ = ("usage", "lines")
    USAGE_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    usage: Usage
    lines: _containers.RepeatedCompositeFieldContainer[InvoiceLine]
    def __init__(self, usage: _Optional[_Union[Usage, _Mapping]] = ..., lines: _Optional[_Iterable[_Union[InvoiceLine, _Mapping]]] = ...) -> None: ...
