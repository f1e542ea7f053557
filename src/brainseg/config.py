"""Every default in one place.

The resolved configuration travels inside each checkpoint and exported model
(``asdict(cfg)``), so a model file alone is enough to use it correctly: rebuild
with ``ExperimentConfig.from_dict(ckpt["config"])``.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict

# The channels of the LGG slices, in file order (Buda et al. 2019).
CHANNELS = ("pre-contrast", "FLAIR", "post-contrast")

# Input conditions a user can produce: which file channel feeds each network channel.
# A missing sequence is a copy of FLAIR (channel 1), as the LGG dataset stores it.
CONDITIONS = {
    "all": (0, 1, 2),
    "pre_missing": (1, 1, 2),
    "post_missing": (0, 1, 1),
    "flair_only": (1, 1, 1),
}

# Input conditions that reproduce other hospitals' data on the LGG slices (``preprocessing.shift_condition``):
# (channel condition, skull stripped, zoom of the brain in the same canvas). Skull stripping is
# ``preprocessing.brain_mask`` (threshold, erosion, largest component, fill); "brats_like" also
# shrinks the brain to 0.78 of its size (a 240 mm field of view at 1 mm, as BraTS volumes have,
# against the ~200 mm of the LGG slices), and the prediction is mapped back before scoring.
SHIFT_CONDITIONS = {
    "skull_stripped": ("all", True, 1.0),
    "skull_stripped_flair_only": ("flair_only", True, 1.0),
    "brats_like": ("all", True, 0.78),
}
EVERY_CONDITION = (*CONDITIONS, *SHIFT_CONDITIONS)

# Display names (the original description prints "Nested U-Net DICE Score: ...").
ARCHITECTURES = ("unetpp", "attention_unet")  # the keys of models.MODELS (tests/test_models.py checks)
SEQUENCES = {"flair": "FLAIR", "t1": "pre-contrast T1", "t1c": "T1 post-contrast", "t2": "T2"}  # what a grey input may be
NORMALIZATIONS = ("minmax", "zscore", "zscore_volume")
PRECISIONS = ("fp32", "int8")  # served network precisions (int8: a quantised ONNX file)
BACKENDS = ("auto", "onnx", "torch")  # ONNX Runtime or PyTorch; auto: predictor.pick_backend's rule
DISPLAY_NAMES = {"unetpp": "Nested U-Net", "attention_unet": "Attention U-Net", "ensemble": "Ensemble (mean probability)"}

# The patient split (``data.split_patients``): its seed, and hold-out shares of the patients
# that scale with the dataset (``data.default_holdout``).
SPLIT_SEED = 42
VAL_FRACTION = 0.15
TEST_FRACTION = 0.25

# Where the data usually lives relative to the repository root (CI has it there too).
DEFAULT_DATA_CANDIDATES = ("../shared/data/lgg/kaggle_3m", "data/kaggle_3m")


_ENVIRON: ContextVar[Mapping[str, str] | None] = ContextVar("brainseg_environ", default=None)


class _Environment(EnvSettingsSource):
    """pydantic-settings' environment source, reading the mapping given to ``Environment.read`` (tests) where
    there is one instead of ``os.environ``."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        given = _ENVIRON.get()
        if given is None:
            return super()._load_env_vars()
        return {k.lower(): v for k, v in given.items() if v != ""}


class Environment(BaseSettings):
    """The ``BRAINSEG_*`` variables the library reads; pydantic-settings is their only reader (the service's
    ``serving.settings.Settings`` adds its own). An empty variable counts as unset.

    BRAINSEG_DATA         the LGG dataset folder (default: the first of DEFAULT_DATA_CANDIDATES that exists)
    BRAINSEG_MODEL_DIR    folder with registry.json (default: the shipped models/)
    BRAINSEG_BACKEND      auto (ONNX Runtime on CPU, PyTorch with CUDA), onnx or torch
    BRAINSEG_ONNX_DEVICE  auto (TensorRT / CUDA where ONNX Runtime offers them), cpu, cuda or tensorrt
    BRAINSEG_LOG_FORMAT   text or json (the CLI's and the service's log lines)
    BRAINSEG_DICOMWEB_AUTH  user:password or a bearer token for ``brainseg dicomweb`` (see dicomweb.py)
    """

    model_config = SettingsConfigDict(env_prefix="BRAINSEG_", env_ignore_empty=True, extra="ignore")

    data: str | None = None
    model_dir: str | None = None
    backend: Literal["auto", "onnx", "torch"] = "auto"
    onnx_device: Literal["auto", "cpu", "cuda", "tensorrt"] = "auto"
    log_format: Literal["text", "json"] = "text"
    dicomweb_auth: str | None = Field(None, repr=False)

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        return (init_settings, _Environment(settings_cls))

    @classmethod
    def read(cls, environ: Mapping[str, str] | None = None, **overrides):
        """From the process environment (or ``environ``: a mapping of ``BRAINSEG_*`` names, for tests); ``overrides`` win.
        A bad value is a ValueError naming the variable."""
        token = _ENVIRON.set(environ)
        try:
            return cls(**overrides)
        except ValidationError as exc:
            raise ValueError("; ".join(f"BRAINSEG_{str(e['loc'][0]).upper()}: {e['msg']}" for e in exc.errors())) from None
        finally:
            _ENVIRON.reset(token)


def default_data_root() -> str:
    """``$BRAINSEG_DATA`` if set, else the first existing candidate folder."""
    env = Environment.read().data
    if env:
        return env
    for cand in DEFAULT_DATA_CANDIDATES:
        if Path(cand).is_dir():
            return cand
    return DEFAULT_DATA_CANDIDATES[0]


@dataclass(frozen=True)
class PreprocessConfig:
    """How one raw slice becomes the network input (see ``preprocessing.preprocess_slice``).

    Order: intensity to uint8 (only for 16-bit / float input) -> CLAHE per channel at
    native resolution -> resize to ``input_size`` -> normalise over the whole slice.
    """

    input_size: int = 128  # square side the network sees (pixels)
    clahe: bool = True
    clahe_clip_limit: float = 2.0
    clahe_tile_grid: int = 8
    # "minmax": /255 to [0, 1]; "zscore": per slice, per channel; "zscore_volume": per channel over the
    # whole volume (a lone slice: over the slice, as "zscore")
    normalization: str = "minmax"


@dataclass(frozen=True)
class ModelConfig:
    name: str = "attention_unet"  # key of models.MODELS
    in_channels: int = 3  # 3 sequences x (2 * context + 1) slices
    out_channels: int = 1
    features: tuple[int, ...] = (16, 32, 64, 128, 256)
    deep_supervision: bool = False  # U-Net++ only
    # 2.5D: neighbouring slices on each side given as extra channels (0 = a 2D model). The input is
    # [slice z - context, ..., z, ..., z + context], three sequences each; a slice with no
    # neighbours (a lone upload, the edge of a volume) repeats itself or its edge slice.
    context: int = 0
    # 3: a true 3D network on stacks of slices (B, 3, D, S, S) (``models.blocks``); 2: slice by slice.
    spatial_dims: int = 2


@dataclass(frozen=True)
class PostprocessConfig:
    """Turning probabilities into a mask; chosen on validation patients, never on test."""

    threshold: float = 0.5
    min_size: int = 0  # connected components smaller than this (pixels at native size) are removed
    components_3d: bool = False  # for stacks of slices (volumes): measure components in 3D, not per slice
    slice_min_size: int | None = None  # for one slice on its own (no stack); None: min_size


@dataclass(frozen=True)
class InferenceConfig:
    """How a model runs when the caller does not say (``scripts/ship_tta.py`` sets it, and only for an option
    that pays on the validation patients and passes the release check on the test patients)."""

    tta: bool = False  # flip test-time augmentation on by default (API, page, CLI, batch)
    tta_postprocess: PostprocessConfig | None = None  # calibrated with TTA on; None: TTA runs at ``postprocess``


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 40
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_epochs: int = 1
    positive_fraction: float = 0.5  # share of lesion-positive slices per batch (foreground-aware sampling)
    samples_per_epoch: int = 0  # 0: as many as training slices
    max_steps: int = 0  # >0 stops early (smoke tests)
    seed: int = 42
    num_threads: int = 0  # 0: torch default
    val_every: int = 1
    workers: int = 0  # DataLoader worker processes (augmentation); 0: in the training process
    ema_decay: float = 0.0  # >0: validate and ship an exponential moving average of the weights
    time_budget_s: float = 0.0  # >0: after epoch 2, shorten ``epochs`` so training fits this many seconds
    checkpoint_every_s: float = 600.0  # >0: also write last.pt within an epoch this often, so a kill loses at most this
    patch_depth: int = 9  # 3D models: consecutive slices per training sample (odd; centred on the drawn slice)
    precise_bn_batches: int = 0  # >0: before each validation, BatchNorm statistics recomputed over this many training batches


@dataclass(frozen=True)
class AugmentConfig:
    hflip: float = 0.5
    vflip: float = 0.0
    affine: float = 0.7
    rotate: float = 15.0
    scale: float = 0.1
    shift: float = 0.0625
    elastic: float = 0.2
    brightness_contrast: float = 0.5
    gamma: float = 0.3
    noise: float = 0.2
    # Sequence dropout: a missing pre- / post-contrast sequence is a copy of FLAIR in its
    # channel (as the LGG dataset stores it). Each is applied independently per sample.
    missing_pre: float = 0.3
    missing_post: float = 0.3
    # Domain shift (other hospitals' data): probability of training on the skull-stripped slice
    # (``preprocessing.skull_strip``, cached beside the plain one), of a smaller brain in the
    # canvas (zoom in [zoom_min, 1]: another field of view), of a smooth illumination (bias)
    # field, of lower resolution (downscale then upscale) and of blur. 0 = off (earlier models).
    skull_strip: float = 0.0
    zoom_out: float = 0.0
    zoom_min: float = 0.65
    bias_field: float = 0.0
    low_resolution: float = 0.0
    blur: float = 0.0
    # 2.5D models: probability that the neighbours are replaced by the slice itself, so the
    # lone-slice fallback (an uploaded single slice) stays in the training distribution.
    context_dropout: float = 0.0


@dataclass(frozen=True)
class ExperimentConfig:
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    def postprocess_for(self, tta: bool) -> PostprocessConfig:
        """The calibrated post-processing of a run with or without flip TTA (each has its own where shipped)."""
        return self.inference.tta_postprocess if tta and self.inference.tta_postprocess is not None else self.postprocess

    @classmethod
    def from_dict(cls, d: dict) -> "ExperimentConfig":
        parts = {
            "preprocess": PreprocessConfig,
            "model": ModelConfig,
            "train": TrainConfig,
            "augment": AugmentConfig,
            "postprocess": PostprocessConfig,
        }
        kwargs = {}
        for name, klass in parts.items():
            kwargs[name] = _build(klass, d.get(name, {}))
        inference = dict(d.get("inference") or {})
        if inference.get("tta_postprocess") is not None:
            inference["tta_postprocess"] = _build(PostprocessConfig, inference["tta_postprocess"])
        kwargs["inference"] = _build(InferenceConfig, inference)
        return cls(**kwargs)


def _build(klass, values: dict):
    """Dataclass from a dict, ignoring unknown keys and turning lists back into tuples."""
    known = {f.name for f in fields(klass)}
    clean = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in known}
    return klass(**clean)
