from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ChangeKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SET: _ClassVar[ChangeKind]
    HOLD: _ClassVar[ChangeKind]
    UNSET: _ClassVar[ChangeKind]
    SCALE: _ClassVar[ChangeKind]
    SHIFT: _ClassVar[ChangeKind]

class OutcomeState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTCOME_STATE_UNSPECIFIED: _ClassVar[OutcomeState]
    APPLIED: _ClassVar[OutcomeState]
    REJECTED: _ClassVar[OutcomeState]
    MISSED: _ClassVar[OutcomeState]
    SUPERSEDED: _ClassVar[OutcomeState]
    OVERRIDDEN: _ClassVar[OutcomeState]
    FIRED: _ClassVar[OutcomeState]

class ParamKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PARAM_KIND_UNSPECIFIED: _ClassVar[ParamKind]
    FLOAT: _ClassVar[ParamKind]
    INT: _ClassVar[ParamKind]
    BOOL: _ClassVar[ParamKind]
    STR: _ClassVar[ParamKind]
    STRUCT: _ClassVar[ParamKind]
    MAP: _ClassVar[ParamKind]

class ReplicaState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REPLICA_STATE_UNSPECIFIED: _ClassVar[ReplicaState]
    STARTING: _ClassVar[ReplicaState]
    RUNNING: _ClassVar[ReplicaState]
    PAUSED: _ClassVar[ReplicaState]
    RESTARTING: _ClassVar[ReplicaState]
    EXITED: _ClassVar[ReplicaState]
    FAILED: _ClassVar[ReplicaState]
    STOPPED: _ClassVar[ReplicaState]
    HUNG: _ClassVar[ReplicaState]
SET: ChangeKind
HOLD: ChangeKind
UNSET: ChangeKind
SCALE: ChangeKind
SHIFT: ChangeKind
OUTCOME_STATE_UNSPECIFIED: OutcomeState
APPLIED: OutcomeState
REJECTED: OutcomeState
MISSED: OutcomeState
SUPERSEDED: OutcomeState
OVERRIDDEN: OutcomeState
FIRED: OutcomeState
PARAM_KIND_UNSPECIFIED: ParamKind
FLOAT: ParamKind
INT: ParamKind
BOOL: ParamKind
STR: ParamKind
STRUCT: ParamKind
MAP: ParamKind
REPLICA_STATE_UNSPECIFIED: ReplicaState
STARTING: ReplicaState
RUNNING: ReplicaState
PAUSED: ReplicaState
RESTARTING: ReplicaState
EXITED: ReplicaState
FAILED: ReplicaState
STOPPED: ReplicaState
HUNG: ReplicaState

class Value(_message.Message):
    __slots__ = ("f", "i", "b", "s", "list", "map")
    F_FIELD_NUMBER: _ClassVar[int]
    I_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    S_FIELD_NUMBER: _ClassVar[int]
    LIST_FIELD_NUMBER: _ClassVar[int]
    MAP_FIELD_NUMBER: _ClassVar[int]
    f: float
    i: int
    b: bool
    s: str
    list: ValueList
    map: ValueMap
    def __init__(self, f: _Optional[float] = ..., i: _Optional[int] = ..., b: _Optional[bool] = ..., s: _Optional[str] = ..., list: _Optional[_Union[ValueList, _Mapping]] = ..., map: _Optional[_Union[ValueMap, _Mapping]] = ...) -> None: ...

class ValueList(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Value]
    def __init__(self, items: _Optional[_Iterable[_Union[Value, _Mapping]]] = ...) -> None: ...

class ValueMap(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[MapEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[MapEntry, _Mapping]]] = ...) -> None: ...

class MapEntry(_message.Message):
    __slots__ = ("key", "value")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    key: str
    value: Value
    def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...

class DesiredParam(_message.Message):
    __slots__ = ("value", "version", "at_step", "change_id", "at_once", "origin", "revision", "base", "kind", "together")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    AT_STEP_FIELD_NUMBER: _ClassVar[int]
    CHANGE_ID_FIELD_NUMBER: _ClassVar[int]
    AT_ONCE_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TOGETHER_FIELD_NUMBER: _ClassVar[int]
    value: Value
    version: int
    at_step: int
    change_id: str
    at_once: bool
    origin: str
    revision: int
    base: DesiredParam
    kind: ChangeKind
    together: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, value: _Optional[_Union[Value, _Mapping]] = ..., version: _Optional[int] = ..., at_step: _Optional[int] = ..., change_id: _Optional[str] = ..., at_once: _Optional[bool] = ..., origin: _Optional[str] = ..., revision: _Optional[int] = ..., base: _Optional[_Union[DesiredParam, _Mapping]] = ..., kind: _Optional[_Union[ChangeKind, str]] = ..., together: _Optional[_Iterable[str]] = ...) -> None: ...

class DesiredState(_message.Message):
    __slots__ = ("version", "params", "pause")
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: DesiredParam
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[DesiredParam, _Mapping]] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    PAUSE_FIELD_NUMBER: _ClassVar[int]
    version: int
    params: _containers.MessageMap[str, DesiredParam]
    pause: DesiredParam
    def __init__(self, version: _Optional[int] = ..., params: _Optional[_Mapping[str, DesiredParam]] = ..., pause: _Optional[_Union[DesiredParam, _Mapping]] = ...) -> None: ...

class Outcome(_message.Message):
    __slots__ = ("name", "version", "state", "step", "old", "new", "reason", "time", "change_id", "seq", "replica", "origin", "revision", "kind", "ended", "parts", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    OLD_FIELD_NUMBER: _ClassVar[int]
    NEW_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    CHANGE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ENDED_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    state: OutcomeState
    step: int
    old: Value
    new: Value
    reason: str
    time: float
    change_id: str
    seq: int
    replica: str
    origin: str
    revision: int
    kind: ChangeKind
    ended: bool
    parts: _containers.RepeatedCompositeFieldContainer[Part]
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., state: _Optional[_Union[OutcomeState, str]] = ..., step: _Optional[int] = ..., old: _Optional[_Union[Value, _Mapping]] = ..., new: _Optional[_Union[Value, _Mapping]] = ..., reason: _Optional[str] = ..., time: _Optional[float] = ..., change_id: _Optional[str] = ..., seq: _Optional[int] = ..., replica: _Optional[str] = ..., origin: _Optional[str] = ..., revision: _Optional[int] = ..., kind: _Optional[_Union[ChangeKind, str]] = ..., ended: _Optional[bool] = ..., parts: _Optional[_Iterable[_Union[Part, _Mapping]]] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class Part(_message.Message):
    __slots__ = ("name", "old", "new", "overridden")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OLD_FIELD_NUMBER: _ClassVar[int]
    NEW_FIELD_NUMBER: _ClassVar[int]
    OVERRIDDEN_FIELD_NUMBER: _ClassVar[int]
    name: str
    old: Value
    new: Value
    overridden: bool
    def __init__(self, name: _Optional[str] = ..., old: _Optional[_Union[Value, _Mapping]] = ..., new: _Optional[_Union[Value, _Mapping]] = ..., overridden: _Optional[bool] = ...) -> None: ...

class Acks(_message.Message):
    __slots__ = ("recent", "read_version", "scheduled")
    RECENT_FIELD_NUMBER: _ClassVar[int]
    READ_VERSION_FIELD_NUMBER: _ClassVar[int]
    SCHEDULED_FIELD_NUMBER: _ClassVar[int]
    recent: _containers.RepeatedCompositeFieldContainer[Outcome]
    read_version: int
    scheduled: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, recent: _Optional[_Iterable[_Union[Outcome, _Mapping]]] = ..., read_version: _Optional[int] = ..., scheduled: _Optional[_Iterable[str]] = ...) -> None: ...

class ParamSpec(_message.Message):
    __slots__ = ("name", "kind", "is_list", "choices", "min", "max", "doc", "builtin", "default", "length", "fields", "item", "optional")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    IS_LIST_FIELD_NUMBER: _ClassVar[int]
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    DOC_FIELD_NUMBER: _ClassVar[int]
    BUILTIN_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    ITEM_FIELD_NUMBER: _ClassVar[int]
    OPTIONAL_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: ParamKind
    is_list: bool
    choices: _containers.RepeatedScalarFieldContainer[str]
    min: float
    max: float
    doc: str
    builtin: bool
    default: Value
    length: int
    fields: _containers.RepeatedCompositeFieldContainer[ParamSpec]
    item: ParamSpec
    optional: bool
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[ParamKind, str]] = ..., is_list: _Optional[bool] = ..., choices: _Optional[_Iterable[str]] = ..., min: _Optional[float] = ..., max: _Optional[float] = ..., doc: _Optional[str] = ..., builtin: _Optional[bool] = ..., default: _Optional[_Union[Value, _Mapping]] = ..., length: _Optional[int] = ..., fields: _Optional[_Iterable[_Union[ParamSpec, _Mapping]]] = ..., item: _Optional[_Union[ParamSpec, _Mapping]] = ..., optional: _Optional[bool] = ...) -> None: ...

class Schema(_message.Message):
    __slots__ = ("params", "group_size", "group_rank", "agree_every")
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    GROUP_RANK_FIELD_NUMBER: _ClassVar[int]
    AGREE_EVERY_FIELD_NUMBER: _ClassVar[int]
    params: _containers.RepeatedCompositeFieldContainer[ParamSpec]
    group_size: int
    group_rank: int
    agree_every: int
    def __init__(self, params: _Optional[_Iterable[_Union[ParamSpec, _Mapping]]] = ..., group_size: _Optional[int] = ..., group_rank: _Optional[int] = ..., agree_every: _Optional[int] = ...) -> None: ...

class Status(_message.Message):
    __slots__ = ("step", "steps_per_sec", "metrics", "paused", "values", "time", "pid", "applied_version", "own", "held", "snapshots", "snapshot_every", "snapshot_keep", "windows", "window_step")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...
    class OwnEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...
    class WindowsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: MetricWindow
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[MetricWindow, _Mapping]] = ...) -> None: ...
    STEP_FIELD_NUMBER: _ClassVar[int]
    STEPS_PER_SEC_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    APPLIED_VERSION_FIELD_NUMBER: _ClassVar[int]
    OWN_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_EVERY_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_KEEP_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_STEP_FIELD_NUMBER: _ClassVar[int]
    step: int
    steps_per_sec: float
    metrics: _containers.ScalarMap[str, float]
    paused: bool
    values: _containers.MessageMap[str, Value]
    time: float
    pid: int
    applied_version: int
    own: _containers.MessageMap[str, Value]
    held: _containers.RepeatedScalarFieldContainer[str]
    snapshots: _containers.RepeatedCompositeFieldContainer[SnapshotInfo]
    snapshot_every: int
    snapshot_keep: int
    windows: _containers.MessageMap[str, MetricWindow]
    window_step: int
    def __init__(self, step: _Optional[int] = ..., steps_per_sec: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ..., paused: _Optional[bool] = ..., values: _Optional[_Mapping[str, Value]] = ..., time: _Optional[float] = ..., pid: _Optional[int] = ..., applied_version: _Optional[int] = ..., own: _Optional[_Mapping[str, Value]] = ..., held: _Optional[_Iterable[str]] = ..., snapshots: _Optional[_Iterable[_Union[SnapshotInfo, _Mapping]]] = ..., snapshot_every: _Optional[int] = ..., snapshot_keep: _Optional[int] = ..., windows: _Optional[_Mapping[str, MetricWindow]] = ..., window_step: _Optional[int] = ...) -> None: ...

class MetricWindow(_message.Message):
    __slots__ = ("count", "mean", "min", "max")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    count: int
    mean: float
    min: float
    max: float
    def __init__(self, count: _Optional[int] = ..., mean: _Optional[float] = ..., min: _Optional[float] = ..., max: _Optional[float] = ...) -> None: ...

class Rule(_message.Message):
    __slots__ = ("name", "when", "then", "cooldown", "across", "replicas", "origin")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WHEN_FIELD_NUMBER: _ClassVar[int]
    THEN_FIELD_NUMBER: _ClassVar[int]
    COOLDOWN_FIELD_NUMBER: _ClassVar[int]
    ACROSS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    name: str
    when: str
    then: str
    cooldown: int
    across: str
    replicas: _containers.RepeatedScalarFieldContainer[str]
    origin: str
    def __init__(self, name: _Optional[str] = ..., when: _Optional[str] = ..., then: _Optional[str] = ..., cooldown: _Optional[int] = ..., across: _Optional[str] = ..., replicas: _Optional[_Iterable[str]] = ..., origin: _Optional[str] = ...) -> None: ...

class SnapshotInfo(_message.Message):
    __slots__ = ("name", "step", "bytes", "periodic", "time", "seconds")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    PERIODIC_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    step: int
    bytes: int
    periodic: bool
    time: float
    seconds: float
    def __init__(self, name: _Optional[str] = ..., step: _Optional[int] = ..., bytes: _Optional[int] = ..., periodic: _Optional[bool] = ..., time: _Optional[float] = ..., seconds: _Optional[float] = ...) -> None: ...

class StateManifest(_message.Message):
    __slots__ = ("source", "step", "tensors", "tree")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TREE_FIELD_NUMBER: _ClassVar[int]
    source: str
    step: int
    tensors: _containers.RepeatedCompositeFieldContainer[StateTensor]
    tree: StateTree
    def __init__(self, source: _Optional[str] = ..., step: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[StateTensor, _Mapping]]] = ..., tree: _Optional[_Union[StateTree, _Mapping]] = ...) -> None: ...

class StateTensor(_message.Message):
    __slots__ = ("dtype", "shape", "offset")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ...) -> None: ...

class StateTree(_message.Message):
    __slots__ = ("none", "b", "i", "f", "s", "list", "tuple", "map", "tensor")
    NONE_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    I_FIELD_NUMBER: _ClassVar[int]
    F_FIELD_NUMBER: _ClassVar[int]
    S_FIELD_NUMBER: _ClassVar[int]
    LIST_FIELD_NUMBER: _ClassVar[int]
    TUPLE_FIELD_NUMBER: _ClassVar[int]
    MAP_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    none: bool
    b: bool
    i: int
    f: float
    s: str
    list: StateItems
    tuple: StateItems
    map: StateItems
    tensor: int
    def __init__(self, none: _Optional[bool] = ..., b: _Optional[bool] = ..., i: _Optional[int] = ..., f: _Optional[float] = ..., s: _Optional[str] = ..., list: _Optional[_Union[StateItems, _Mapping]] = ..., tuple: _Optional[_Union[StateItems, _Mapping]] = ..., map: _Optional[_Union[StateItems, _Mapping]] = ..., tensor: _Optional[int] = ...) -> None: ...

class StateItems(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[StateTree]
    def __init__(self, items: _Optional[_Iterable[_Union[StateTree, _Mapping]]] = ...) -> None: ...

class ReplicaStatus(_message.Message):
    __slots__ = ("job", "replica", "host", "state", "restarts", "exit_code", "status", "device_uuid", "device_name", "gpu_util", "gpu_mem_used", "gpu_mem_total", "time", "pid")
    JOB_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    GPU_UTIL_FIELD_NUMBER: _ClassVar[int]
    GPU_MEM_USED_FIELD_NUMBER: _ClassVar[int]
    GPU_MEM_TOTAL_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    job: str
    replica: str
    host: str
    state: ReplicaState
    restarts: int
    exit_code: int
    status: Status
    device_uuid: str
    device_name: str
    gpu_util: float
    gpu_mem_used: float
    gpu_mem_total: float
    time: float
    pid: int
    def __init__(self, job: _Optional[str] = ..., replica: _Optional[str] = ..., host: _Optional[str] = ..., state: _Optional[_Union[ReplicaState, str]] = ..., restarts: _Optional[int] = ..., exit_code: _Optional[int] = ..., status: _Optional[_Union[Status, _Mapping]] = ..., device_uuid: _Optional[str] = ..., device_name: _Optional[str] = ..., gpu_util: _Optional[float] = ..., gpu_mem_used: _Optional[float] = ..., gpu_mem_total: _Optional[float] = ..., time: _Optional[float] = ..., pid: _Optional[int] = ...) -> None: ...

class JobInfo(_message.Message):
    __slots__ = ("job", "host", "replicas", "started", "script", "pid", "node_rank", "nnodes", "heartbeat", "broker", "finished", "exit_code", "hung")
    JOB_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    SCRIPT_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    NODE_RANK_FIELD_NUMBER: _ClassVar[int]
    NNODES_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    BROKER_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    HUNG_FIELD_NUMBER: _ClassVar[int]
    job: str
    host: str
    replicas: _containers.RepeatedScalarFieldContainer[str]
    started: float
    script: str
    pid: int
    node_rank: int
    nnodes: int
    heartbeat: float
    broker: str
    finished: float
    exit_code: int
    hung: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, job: _Optional[str] = ..., host: _Optional[str] = ..., replicas: _Optional[_Iterable[str]] = ..., started: _Optional[float] = ..., script: _Optional[str] = ..., pid: _Optional[int] = ..., node_rank: _Optional[int] = ..., nnodes: _Optional[int] = ..., heartbeat: _Optional[float] = ..., broker: _Optional[str] = ..., finished: _Optional[float] = ..., exit_code: _Optional[int] = ..., hung: _Optional[_Iterable[str]] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("job", "replica", "kind", "text", "time", "step", "code")
    JOB_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    job: str
    replica: str
    kind: str
    text: str
    time: float
    step: int
    code: int
    def __init__(self, job: _Optional[str] = ..., replica: _Optional[str] = ..., kind: _Optional[str] = ..., text: _Optional[str] = ..., time: _Optional[float] = ..., step: _Optional[int] = ..., code: _Optional[int] = ...) -> None: ...

class Device(_message.Message):
    __slots__ = ("uuid", "job", "replica", "host", "pid", "name", "memory")
    UUID_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    uuid: str
    job: str
    replica: str
    host: str
    pid: int
    name: str
    memory: int
    def __init__(self, uuid: _Optional[str] = ..., job: _Optional[str] = ..., replica: _Optional[str] = ..., host: _Optional[str] = ..., pid: _Optional[int] = ..., name: _Optional[str] = ..., memory: _Optional[int] = ...) -> None: ...

class DeviceFailure(_message.Message):
    __slots__ = ("uuid", "reason")
    UUID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    uuid: str
    reason: str
    def __init__(self, uuid: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class MetricSeries(_message.Message):
    __slots__ = ("job", "replica", "steps", "times", "columns", "limit")
    JOB_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    TIMES_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    job: str
    replica: str
    steps: _containers.RepeatedScalarFieldContainer[int]
    times: _containers.RepeatedScalarFieldContainer[float]
    columns: _containers.RepeatedCompositeFieldContainer[MetricColumn]
    limit: int
    def __init__(self, job: _Optional[str] = ..., replica: _Optional[str] = ..., steps: _Optional[_Iterable[int]] = ..., times: _Optional[_Iterable[float]] = ..., columns: _Optional[_Iterable[_Union[MetricColumn, _Mapping]]] = ..., limit: _Optional[int] = ...) -> None: ...

class MetricColumn(_message.Message):
    __slots__ = ("name", "values")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    name: str
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, name: _Optional[str] = ..., values: _Optional[_Iterable[float]] = ...) -> None: ...

class GroupFailure(_message.Message):
    __slots__ = ("job", "node_rank", "attempt", "give_up", "reason", "exit_code", "time", "stopped")
    JOB_FIELD_NUMBER: _ClassVar[int]
    NODE_RANK_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    GIVE_UP_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    STOPPED_FIELD_NUMBER: _ClassVar[int]
    job: str
    node_rank: int
    attempt: int
    give_up: bool
    reason: str
    exit_code: int
    time: float
    stopped: bool
    def __init__(self, job: _Optional[str] = ..., node_rank: _Optional[int] = ..., attempt: _Optional[int] = ..., give_up: _Optional[bool] = ..., reason: _Optional[str] = ..., exit_code: _Optional[int] = ..., time: _Optional[float] = ..., stopped: _Optional[bool] = ...) -> None: ...
