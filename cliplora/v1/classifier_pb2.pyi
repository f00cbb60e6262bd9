from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ClassifyRequest(_message.Message):
    __slots__ = ("model", "version", "images", "top_k", "labels", "templates", "adapter")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    TEMPLATES_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    images: _containers.RepeatedCompositeFieldContainer[Image]
    top_k: int
    labels: _containers.RepeatedScalarFieldContainer[str]
    templates: _containers.RepeatedScalarFieldContainer[str]
    adapter: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., top_k: _Optional[int] = ..., labels: _Optional[_Iterable[str]] = ..., templates: _Optional[_Iterable[str]] = ..., adapter: _Optional[str] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("encoded", "raw")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    raw: RawImage
    def __init__(self, encoded: _Optional[bytes] = ..., raw: _Optional[_Union[RawImage, _Mapping]] = ...) -> None: ...

class RawImage(_message.Message):
    __slots__ = ("rgb", "width", "height")
    RGB_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    rgb: bytes
    width: int
    height: int
    def __init__(self, rgb: _Optional[bytes] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("label", "index", "score", "logit")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    LOGIT_FIELD_NUMBER: _ClassVar[int]
    label: str
    index: int
    score: float
    logit: float
    def __init__(self, label: _Optional[str] = ..., index: _Optional[int] = ..., score: _Optional[float] = ..., logit: _Optional[float] = ...) -> None: ...

class Classification(_message.Message):
    __slots__ = ("predictions",)
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    def __init__(self, predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("model", "version", "results", "adapter")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    results: _containers.RepeatedCompositeFieldContainer[Classification]
    adapter: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., results: _Optional[_Iterable[_Union[Classification, _Mapping]]] = ..., adapter: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "versions", "num_classes", "image_size", "base_model", "weights", "lora_format", "lora_json", "precision", "open_vocabulary", "embedding_dim", "kind", "adapters")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    LORA_FORMAT_FIELD_NUMBER: _ClassVar[int]
    LORA_JSON_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    OPEN_VOCABULARY_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DIM_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    versions: _containers.RepeatedScalarFieldContainer[int]
    num_classes: int
    image_size: int
    base_model: str
    weights: str
    lora_format: str
    lora_json: str
    precision: str
    open_vocabulary: bool
    embedding_dim: int
    kind: str
    adapters: _containers.RepeatedCompositeFieldContainer[AdapterInfo]
    def __init__(self, name: _Optional[str] = ..., versions: _Optional[_Iterable[int]] = ..., num_classes: _Optional[int] = ..., image_size: _Optional[int] = ..., base_model: _Optional[str] = ..., weights: _Optional[str] = ..., lora_format: _Optional[str] = ..., lora_json: _Optional[str] = ..., precision: _Optional[str] = ..., open_vocabulary: _Optional[bool] = ..., embedding_dim: _Optional[int] = ..., kind: _Optional[str] = ..., adapters: _Optional[_Iterable[_Union[AdapterInfo, _Mapping]]] = ...) -> None: ...

class AdapterInfo(_message.Message):
    __slots__ = ("id", "num_classes", "rank", "lora_sha256", "promoted_to", "matrices", "version_added")
    ID_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    LORA_SHA256_FIELD_NUMBER: _ClassVar[int]
    PROMOTED_TO_FIELD_NUMBER: _ClassVar[int]
    MATRICES_FIELD_NUMBER: _ClassVar[int]
    VERSION_ADDED_FIELD_NUMBER: _ClassVar[int]
    id: str
    num_classes: int
    rank: int
    lora_sha256: str
    promoted_to: str
    matrices: _containers.RepeatedScalarFieldContainer[str]
    version_added: int
    def __init__(self, id: _Optional[str] = ..., num_classes: _Optional[int] = ..., rank: _Optional[int] = ..., lora_sha256: _Optional[str] = ..., promoted_to: _Optional[str] = ..., matrices: _Optional[_Iterable[str]] = ..., version_added: _Optional[int] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("model", "version", "images", "texts", "adapter")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    images: _containers.RepeatedCompositeFieldContainer[Image]
    texts: _containers.RepeatedScalarFieldContainer[str]
    adapter: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., texts: _Optional[_Iterable[str]] = ..., adapter: _Optional[str] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("model", "version", "images", "texts")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    images: _containers.RepeatedCompositeFieldContainer[Embedding]
    texts: _containers.RepeatedCompositeFieldContainer[Embedding]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., images: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., texts: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ...) -> None: ...
