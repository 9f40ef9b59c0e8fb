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
    __slots__ = ("protocol_version", "run_id", "round", "model_version", "header_digest", "tail", "seeds", "hyper", "header", "server_signature", "secure")
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
    SECURE_FIELD_NUMBER: _ClassVar[int]
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
    secure: SecureStep
    def __init__(self, protocol_version: _Optional[int] = ..., run_id: _Optional[int] = ..., round: _Optional[int] = ..., model_version: _Optional[int] = ..., header_digest: _Optional[str] = ..., tail: _Optional[_Union[LedgerTail, _Mapping]] = ..., seeds: _Optional[_Iterable[int]] = ..., hyper: _Optional[_Union[Hyperparameters, _Mapping]] = ..., header: _Optional[_Union[LedgerHeader, _Mapping]] = ..., server_signature: _Optional[bytes] = ..., secure: _Optional[_Union[SecureStep, _Mapping]] = ...) -> None: ...

class SecureStep(_message.Message):
    __slots__ = ("stage", "ring", "degree", "threshold", "peers", "inbox", "survivors", "dropped")
    class PeersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: PeerKeys
        def __init__(self, key: _Optional[int] = ..., value: _Optional[_Union[PeerKeys, _Mapping]] = ...) -> None: ...
    class InboxEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: bytes
        def __init__(self, key: _Optional[int] = ..., value: _Optional[bytes] = ...) -> None: ...
    STAGE_FIELD_NUMBER: _ClassVar[int]
    RING_FIELD_NUMBER: _ClassVar[int]
    DEGREE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    INBOX_FIELD_NUMBER: _ClassVar[int]
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    stage: int
    ring: _containers.RepeatedScalarFieldContainer[int]
    degree: int
    threshold: int
    peers: _containers.MessageMap[int, PeerKeys]
    inbox: _containers.ScalarMap[int, bytes]
    survivors: _containers.RepeatedScalarFieldContainer[int]
    dropped: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, stage: _Optional[int] = ..., ring: _Optional[_Iterable[int]] = ..., degree: _Optional[int] = ..., threshold: _Optional[int] = ..., peers: _Optional[_Mapping[int, PeerKeys]] = ..., inbox: _Optional[_Mapping[int, bytes]] = ..., survivors: _Optional[_Iterable[int]] = ..., dropped: _Optional[_Iterable[int]] = ...) -> None: ...

class PeerKeys(_message.Message):
    __slots__ = ("encryption", "masking")
    ENCRYPTION_FIELD_NUMBER: _ClassVar[int]
    MASKING_FIELD_NUMBER: _ClassVar[int]
    encryption: bytes
    masking: bytes
    def __init__(self, encryption: _Optional[bytes] = ..., masking: _Optional[bytes] = ...) -> None: ...

class ShareAnswer(_message.Message):
    __slots__ = ("kind", "share")
    KIND_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    kind: str
    share: bytes
    def __init__(self, kind: _Optional[str] = ..., share: _Optional[bytes] = ...) -> None: ...

class SecureReply(_message.Message):
    __slots__ = ("keys", "shares", "masked", "answers")
    class SharesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: bytes
        def __init__(self, key: _Optional[int] = ..., value: _Optional[bytes] = ...) -> None: ...
    class AnswersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: ShareAnswer
        def __init__(self, key: _Optional[int] = ..., value: _Optional[_Union[ShareAnswer, _Mapping]] = ...) -> None: ...
    KEYS_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    MASKED_FIELD_NUMBER: _ClassVar[int]
    ANSWERS_FIELD_NUMBER: _ClassVar[int]
    keys: PeerKeys
    shares: _containers.ScalarMap[int, bytes]
    masked: bytes
    answers: _containers.MessageMap[int, ShareAnswer]
    def __init__(self, keys: _Optional[_Union[PeerKeys, _Mapping]] = ..., shares: _Optional[_Mapping[int, bytes]] = ..., masked: _Optional[bytes] = ..., answers: _Optional[_Mapping[int, ShareAnswer]] = ...) -> None: ...

class Reply(_message.Message):
    __slots__ = ("protocol_version", "run_id", "round", "node", "model_version", "scalars", "metrics", "refusal", "state_digest", "runtime", "holder", "signature", "counts", "refusal_code", "secure")
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
    SECURE_FIELD_NUMBER: _ClassVar[int]
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
    secure: SecureReply
    def __init__(self, protocol_version: _Optional[int] = ..., run_id: _Optional[int] = ..., round: _Optional[int] = ..., node: _Optional[int] = ..., model_version: _Optional[int] = ..., scalars: _Optional[bytes] = ..., metrics: _Optional[_Mapping[str, float]] = ..., refusal: _Optional[str] = ..., state_digest: _Optional[str] = ..., runtime: _Optional[str] = ..., holder: _Optional[str] = ..., signature: _Optional[bytes] = ..., counts: _Optional[_Iterable[float]] = ..., refusal_code: _Optional[str] = ..., secure: _Optional[_Union[SecureReply, _Mapping]] = ...) -> None: ...

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
