"""The API's answers as pydantic models: what ``POST /v1/segment``, ``GET /v1/results/{id}``, ``GET /v1/models`` and
``GET /health`` answer with 200, written once. The routes document them in the OpenAPI spec (so schemathesis checks
every answer it provokes against them), the tests validate real answers with them, and the page reads an answer
through ``parse_answer``.

The top-level answers forbid keys they do not list: an answer that grows a key without its model fails the tests.
Blocks whose content depends on the input (``input``: a slice, a NIfTI volume, a DICOM study; a lesion row: a slice's
or a volume's measurements) list what is always there and allow the rest.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ModelBlock(_Closed):
    name: str = Field(description="registry name, or ensemble")
    display_name: str
    version: str = Field(description="names the weights: predictor.version (fp32: the checkpoint's hash; INT8: its file's)")
    backend: str = Field(description="onnx or torch (ensemble: both joined with +)")
    precision: str = Field(description="fp32 or int8")
    members: list[str] | None = Field(None, description="an ensemble's models")


class Lesion(_Open):
    """One connected component, largest first: a slice's (``area_*``) or a volume's (``voxels``, ``volume_*``, ``slice_range``)."""

    id: int
    bbox: list[int] = Field(description="[row0, col0, row1, col1] (slice) or [z0, row0, col0, z1, row1, col1] (volume), end-exclusive")
    centroid: list[float]
    longest_diameter_mm: float | None = Field(description="RANO-BM longest axial diameter; None when the pixel spacing is unknown")
    perpendicular_diameter_mm: float | None
    measurable: bool | None = Field(description=">= 10 mm (RANO-BM); None when the pixel spacing is unknown")
    confidence: float | None = Field(None, description="mean probability inside the lesion")
    tta_disagreement: float | None = Field(None, description="mean |plain - flipped| probability inside it, where TTA ran")


class RanoBlock(_Open):
    measurable_min_mm: float
    measurable_count: int | None
    target_lesion_ids: list[int]
    sum_longest_diameters_mm: float | None


class InputBlock(_Open):
    """How the input was read: its size, the sequences the model saw, warnings."""

    condition: str = Field(description="all, pre_missing, post_missing or flair_only: the sequences the model got")
    channels_read_as: list[str]
    read_as: str
    warnings: list[str]
    notes: list[str]
    channels_given: int


class _Answer(_Closed):
    id: str = Field(description="the stored result's id (GET /v1/results/{id}, its downloads)")
    model: ModelBlock
    threshold: float
    min_size: int
    components: str
    tta: bool
    files: list[str]
    timings_ms: dict[str, float] = Field(description="decode, inference, answer, store, total (and network for volumes), in ms")
    input: InputBlock
    lesion_count: int
    lesions: list[Lesion]
    lesions_truncated: bool
    rano_bm: RanoBlock
    urls: dict[str, str] = Field(description="the result's downloads (mask, slices, report, viewer, DICOM SEG / SR / SC where there are)")


class SliceAnswer(_Answer):
    kind: Literal["slice"]
    lesion_area_px: int
    lesion_area_mm2: float | None
    images_inline: bool = Field(description="whether mask_png / overlay_png are in the answer (slices up to BRAINSEG_INLINE_PNG_MAX_PIXELS)")
    mask_png: str | None = Field(None, description="base64 PNG, when asked for (return=) and inline")
    overlay_png: str | None = Field(None, description="base64 PNG, when asked for (return=) and inline")


class VolumeAnswer(_Answer):
    kind: Literal["volume"]
    lesion_voxels: int
    lesion_volume_mm3: float | None
    slices: int
    slice_lesion_area_px: list[int]
    slice_lesion_area_mm2: list[float] | None
    slices_with_lesion: list[int]
    background_slices_skipped: list[int]
    preview_slice: int
    mask_url: str
    preview_png: str | None = Field(None, description="base64 PNG of preview_slice, when asked for (return=)")


SegmentAnswer = Annotated[SliceAnswer | VolumeAnswer, Field(discriminator="kind")]
SEGMENT_ANSWER: TypeAdapter = TypeAdapter(SegmentAnswer)


def parse_answer(body: dict) -> SliceAnswer | VolumeAnswer:
    """A /v1/segment (or /v1/results/{id}) answer, checked against its model; pydantic's ValidationError otherwise."""
    return SEGMENT_ANSWER.validate_python(body)


class TTAInfo(_Open):
    default: bool = Field(description="whether a request that does not say tta runs flip TTA (scripts/ship_tta.py)")
    threshold: float = Field(description="the threshold a run with TTA uses (calibrated for it where shipped)")
    min_size: int
    precision: str = Field(description="the precision a run with TTA that names none uses")


class ModelInfo(_Open):
    name: str
    display_name: str
    parameters: int | None = None
    threshold: float
    min_size: int
    tta: TTAInfo | None = None
    default_precision_without_tta: str | None = None
    input_size: int | None = None
    metrics: dict[str, float | None]
    backend: str
    version: str
    versions: dict[str, str] = Field(description="the version of each precision the model has")
    precisions: list[str]
    default_precision: str


class ModelsAnswer(_Closed):
    default: str
    selected_by: str | None
    channels: list[str]
    models: list[ModelInfo]


class HealthAnswer(_Open):
    status: str
    version: str = Field(description="brainseg's version")
    models_ready: bool
    default_model: str | None
    models: list[str]
    loaded_models: list[str]
    results_kept: int
