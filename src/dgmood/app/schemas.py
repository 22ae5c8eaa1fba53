"""The JSON of ``dgmood serve`` as pydantic models: what ``/openapi.json`` publishes and clients are generated from.

Scores are higher = more in-distribution; ``in_distribution`` is score >= threshold; a non-finite score is sent
as null and counts as OOD; ``reasons`` names the statistics furthest from training (e.g.
``"knn +6.2σ; complexity -4.1σ"``) or is empty.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

__all__ = ["BatchExplanation", "BatchScore", "ErrorBody", "Explanation", "Health", "Info", "Score", "body_schema"]


class _Detector(BaseModel):
    threshold: float = Field(description="Scores at or above it are in-distribution.")
    detector: str = Field(description="The fitted method's name, e.g. combined.")
    model_sha256: str = Field(description="SHA-256 of the model's weights file.")


class Score(_Detector):
    """The verdict on one image."""

    score: float | None = Field(description="Higher = more in-distribution; null when not finite (then OOD).")
    in_distribution: bool
    reasons: str = Field(description="Statistics furthest from training, e.g. 'knn +6.2σ', or ''.")


class BatchScore(_Detector):
    """The verdicts on N images, in upload order."""

    scores: list[float | None]
    in_distribution: list[bool]
    reasons: list[str]
    n: int


class Explanation(Score):
    """The verdict on one image and its anomaly map drawn over it."""

    map: str | None = Field(description="PNG data URI of the map over the image (brighter = more anomalous), "
                                        "or null when the detector has no map.")


class BatchExplanation(BatchScore):
    """The verdicts on N images and their anomaly maps."""

    maps: list[str | None]


class Health(BaseModel):
    status: str = Field(examples=["ok"])


class Info(BaseModel):
    """What is being served."""

    detector: str
    model_sha256: str
    image_size: list[int] = Field(description="[height, width, channels] the model takes.")
    resize: str = Field(description="What happens to an image of another size: 'error' = refused (422).")
    threshold: float
    max_bytes: int = Field(description="Largest upload accepted, in bytes.")
    max_images: int = Field(description="Most images in one request.")
    batch_size: int = Field(description="Most images scored together in one network pass.")
    batch_wait_ms: float = Field(description="Longest wait for more requests to join a batch.")
    max_queue: int = Field(description="Most requests admitted at once; more get 503.")


class ErrorBody(BaseModel):
    """Every refusal: a one-line message saying what to do."""

    error: str


def body_schema() -> dict:
    """The OpenAPI request body of ``POST /score`` and ``POST /explain``: one file raw, or a form of files."""
    binary = {"type": "string", "format": "binary"}
    return {"required": True, "content": {
        "image/png": {"schema": binary},
        "image/jpeg": {"schema": binary},
        "application/octet-stream": {"schema": binary, "description": "A PNG, JPEG or .npy file (numpy.save): one "
                                     "image (H, W), (H, W, C), (C, H, W) or a batch (N, H, W[, C]), (N, C, H, W)."},
        "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                           "properties": {"file": {"type": "array", "items": binary}}}},
    }}
