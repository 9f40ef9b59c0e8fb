from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LedgerHeader(_message.Message):
    __slots__ = ("format_version", "base_model_digest", "trainable_digest", "config_json", "direction", "noise", "created_utc", "noise_params", "allowed_nodes")
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    TRAINABLE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    NOISE_FIELD_NUMBER: _ClassVar[int]
    CREATED_UTC_FIELD_NUMBER: _ClassVar[int]
    NOISE_PARAMS_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_NODES_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    base_model_digest: str
    trainable_digest: str
    config_json: str
    direction: str
    noise: str
    created_utc: str
    noise_params: str
    allowed_nodes: str
    def __init__(self, format_version: _Optional[int] = ..., base_model_digest: _Optional[str] = ..., trainable_digest: _Optional[str] = ..., config_json: _Optional[str] = ..., direction: _Optional[str] = ..., noise: _Optional[str] = ..., created_utc: _Optional[str] = ..., noise_params: _Optional[str] = ..., allowed_nodes: _Optional[str] = ...) -> None: ...

class LedgerTail(_message.Message):
    __slots__ = ("start_index", "prev_hash", "seeds", "coeffs", "rounds", "head_hash")
    START_INDEX_FIELD_NUMBER: _ClassVar[int]
    PREV_HASH_FIELD_NUMBER: _ClassVar[int]
    SEEDS_FIELD_NUMBER: _ClassVar[int]
    COEFFS_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    HEAD_HASH_FIELD_NUMBER: _ClassVar[int]
    start_index: int
    prev_hash: bytes
    seeds: _containers.RepeatedScalarFieldContainer[int]
    coeffs: _containers.RepeatedScalarFieldContainer[float]
    rounds: _containers.RepeatedScalarFieldContainer[int]
    head_hash: bytes
    def __init__(self, start_index: _Optional[int] = ..., prev_hash: _Optional[bytes] = ..., seeds: _Optional[_Iterable[int]] = ..., coeffs: _Optional[_Iterable[float]] = ..., rounds: _Optional[_Iterable[int]] = ..., head_hash: _Optional[bytes] = ...) -> None: ...

class Hyperparameters(_message.Message):
    __slots__ = ("lr", "mu", "clip", "sample_rate", "private", "noise")
    LR_FIELD_NUMBER: _ClassVar[int]
    MU_FIELD_NUMBER: _ClassVar[int]
    CLIP_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    PRIVATE_FIELD_NUMBER: _ClassVar[int]
    NOISE_FIELD_NUMBER: _ClassVar[int]
    lr: float
    mu: float
    clip: float
    sample_rate: float
    private: bool
    noise: str
    def __init__(self, lr: _Optional[float] = ..., mu: _Optional[float] = ..., clip: _Optional[float] = ..., sample_rate: _Optional[float] = ..., private: _Optional[bool] = ..., noise: _Optional[str] = ...) -> None: ...

class Instruction(_message.Message):
    __slots__ = ("protocol_version", "run_id", "round", "model_version", "header_digest", "tail", "seeds", "hyper", "header", "server_signature")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    HEADER_DIGEST_FIELD_NUMBER: _ClassVar[int]
    TAIL_FIELD_NUMBER: _ClassVar[int]
    SEEDS_FIELD_NUMBER: _ClassVar[int]
    HYPER_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    SERVER_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    run_id: int
    round: int
    model_version: int
    header_digest: str
    tail: LedgerTail
    seeds: _containers.RepeatedScalarFieldContainer[int]
    hyper: Hyperparameters
    header: LedgerHeader
    server_signature: bytes
    def __init__(self, protocol_version: _Optional[int] = ..., run_id: _Optional[int] = ..., round: _Optional[int] = ..., model_version: _Optional[int] = ..., header_digest: _Optional[str] = ..., tail: _Optional[_Union[LedgerTail, _Mapping]] = ..., seeds: _Optional[_Iterable[int]] = ..., hyper: _Optional[_Union[Hyperparameters, _Mapping]] = ..., header: _Optional[_Union[LedgerHeader, _Mapping]] = ..., server_signature: _Optional[bytes] = ...) -> None: ...

class Reply(_message.Message):
    __slots__ = ("protocol_version", "run_id", "round", "node", "model_version", "scalars", "metrics", "refusal", "state_digest", "runtime", "holder", "signature", "counts", "refusal_code")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SCALARS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_FIELD_NUMBER: _ClassVar[int]
    STATE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_CODE_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    run_id: int
    round: int
    node: int
    model_version: int
    scalars: bytes
    metrics: _containers.ScalarMap[str, float]
    refusal: str
    state_digest: str
    runtime: str
    holder: str
    signature: bytes
    counts: _containers.RepeatedScalarFieldContainer[float]
    refusal_code: str
    def __init__(self, protocol_version: _Optional[int] = ..., run_id: _Optional[int] = ..., round: _Optional[int] = ..., node: _Optional[int] = ..., model_version: _Optional[int] = ..., scalars: _Optional[bytes] = ..., metrics: _Optional[_Mapping[str, float]] = ..., refusal: _Optional[str] = ..., state_digest: _Optional[str] = ..., runtime: _Optional[str] = ..., holder: _Optional[str] = ..., signature: _Optional[bytes] = ..., counts: _Optional[_Iterable[float]] = ..., refusal_code: _Optional[str] = ...) -> None: ...

class Challenge(_message.Message):
    __slots__ = ("protocol_version", "run_id", "header_digest", "nonce")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    HEADER_DIGEST_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    run_id: int
    header_digest: str
    nonce: bytes
    def __init__(self, protocol_version: _Optional[int] = ..., run_id: _Optional[int] = ..., header_digest: _Optional[str] = ..., nonce: _Optional[bytes] = ...) -> None: ...

class Identity(_message.Message):
    __slots__ = ("protocol_version", "run_id", "node", "holder", "public_key", "signature", "refusal")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    run_id: int
    node: int
    holder: str
    public_key: str
    signature: bytes
    refusal: str
    def __init__(self, protocol_version: _Optional[int] = ..., run_id: _Optional[int] = ..., node: _Optional[int] = ..., holder: _Optional[str] = ..., public_key: _Optional[str] = ..., signature: _Optional[bytes] = ..., refusal: _Optional[str] = ...) -> None: ...
