"""What the three input channels hold, and how a grey or single-sequence input is read.

The networks take pre-contrast T1, FLAIR and post-contrast T1, in that order. A missing pre- or
post-contrast sequence is a copy of FLAIR in its channel (as the LGG dataset stores it), and a
grey image is repeated into all three channels: the "FLAIR only" condition. This module names
the condition of an input and builds the ``input`` block that the API, the CLI and the page
report. Pure numpy, no torch.
"""

from __future__ import annotations

import numpy as np

from ..config import CONDITIONS as _CONDITIONS
from ..config import SEQUENCES

# Sequences a grey image (or a single volume) may be; the value is how it is written for people.
DEFAULT_SEQUENCE = "flair"
# BraTS file tags (volumes.brats_sequence) and other common spellings -> a sequence above.
SEQUENCE_ALIASES = {"t2f": "flair", "t1n": "t1", "t1ce": "t1c", "t1gd": "t1c", "t2w": "t2"}

CONDITIONS = tuple(_CONDITIONS)  # all, pre_missing, post_missing, flair_only
CHANNELS_READ_AS = {
    "all": ["pre-contrast T1", "FLAIR", "post-contrast T1"],
    "pre_missing": ["FLAIR", "FLAIR", "post-contrast T1"],
    "post_missing": ["pre-contrast T1", "FLAIR", "FLAIR"],
    "flair_only": ["FLAIR", "FLAIR", "FLAIR"],
}
PRE_MISSING = "pre-contrast missing (a copy of FLAIR)"
POST_MISSING = "post-contrast missing (a copy of FLAIR)"
IDENTICAL = "the three channels are identical: read as one grey image (FLAIR only)"
FLOAT_TOLERANCE = 1e-5  # of the image's value range, for float images


def parse_sequence(raw: str | None) -> str | None:
    """``flair``, ``t1``, ``t1c``, ``t2`` (any case; BraTS tags such as ``t2f`` too); None for none given.

    Raises ValueError with a plain message for anything else.
    """
    if raw is None or str(raw).strip() == "":
        return None
    v = str(raw).strip().lower()
    v = SEQUENCE_ALIASES.get(v, v)
    if v not in SEQUENCES:
        choices = ", ".join(f"{k} ({name})" for k, name in SEQUENCES.items())
        raise ValueError(f"sequence must be one of {choices}, got {raw!r}; it says what a grey (one-channel) image or a single volume is")
    return v


def sequence_warning(sequence: str) -> str | None:
    """The plain warning for a single image that is not FLAIR; None for FLAIR."""
    if sequence == "flair":
        return None
    return (
        f"The model was trained on FLAIR (with or without T1 / T1 post-contrast beside it), so a single "
        f"{SEQUENCES[sequence]} image is outside what it was trained for and the mask is unreliable."
    )


def _same(a: np.ndarray, b: np.ndarray, tol: float) -> bool:
    if tol == 0:
        return bool(np.array_equal(a, b))
    return bool(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)), initial=0.0) <= tol)


def channel_condition(image: np.ndarray) -> str:
    """Condition of a (..., 3) slice or volume: ``flair_only`` when the three channels are equal,
    ``pre_missing`` / ``post_missing`` when channel 0 / 2 equals channel 1 (FLAIR), else ``all``.

    Integer images must match exactly; float images within ``FLOAT_TOLERANCE`` of their range.
    """
    if image.ndim < 3 or image.shape[-1] != 3:
        raise ValueError(f"expected 3 channels last, got shape {image.shape}")
    tol = 0.0
    if image.dtype.kind == "f":
        finite = image[np.isfinite(image)]
        span = float(finite.max() - finite.min()) if finite.size else 0.0
        tol = FLOAT_TOLERANCE * max(span, 1e-12)
    pre, flair, post = image[..., 0], image[..., 1], image[..., 2]
    pre_same, post_same = _same(pre, flair, tol), _same(post, flair, tol)
    if pre_same and post_same:
        return "flair_only"
    if pre_same:
        return "pre_missing"
    if post_same:
        return "post_missing"
    return "all"


def input_block(
    condition: str, *, sequence: str | None = None, requested: str | None = None, what: str = "image", grey: bool = False, notes: list[str] | None = None
) -> dict:
    """The ``input`` description the API, the CLI (``X_lesions.json``) and the page report.

    ``condition``: one of CONDITIONS. ``sequence``: the sequence of a single image, decided by
    the caller (the request, the file name or the default); used only for ``flair_only``.
    ``requested``: the sequence the user asked for (None: not asked), to say when it does not
    apply. ``grey``: the input had one channel (not three identical ones). ``what``: "image" or
    "volume", for the messages.
    """
    notes = list(notes or [])
    warnings: list[str] = []
    if condition == "flair_only":
        seq = sequence or requested or DEFAULT_SEQUENCE
        if not grey and IDENTICAL not in notes:
            notes.insert(0, IDENTICAL)
        kind = ("grey image" if what == "image" else "one sequence") if grey else "three identical channels"
        if seq == "flair":
            read_as = f"FLAIR only ({kind})"
        else:
            read_as = f"{SEQUENCES[seq]} only ({kind}), given to the model as FLAIR only (repeated into all 3 channels)"
            warnings.append(sequence_warning(seq))
    else:
        seq = None
        if condition == "pre_missing":
            notes.insert(0, PRE_MISSING)
        elif condition == "post_missing":
            notes.insert(0, POST_MISSING)
        read_as = {
            "all": "pre-contrast T1, FLAIR, post-contrast T1",
            "pre_missing": "FLAIR and post-contrast T1 (pre-contrast missing: a copy of FLAIR)",
            "post_missing": "pre-contrast T1 and FLAIR (post-contrast missing: a copy of FLAIR)",
        }[condition]
        if requested is not None:
            notes.append(f"sequence '{requested}' does not apply: the {what} has its own channels (read as {read_as})")
    return {
        "condition": condition,
        "channels_read_as": list(CHANNELS_READ_AS[condition]),
        "sequence": seq,
        "read_as": read_as,
        "warnings": warnings,
        "notes": notes,
    }


def stored_channels(image: np.ndarray) -> int:
    """Channels of a decoded slice as stored: 1 for grey, else 3 or 4 (planar TIFF included)."""
    if image.ndim == 3 and image.shape[0] in (3, 4) and image.shape[2] > 4:
        return int(image.shape[0])  # planar (C, H, W)
    return int(image.shape[2]) if image.ndim == 3 else 1


def describe_slice(image: np.ndarray, channels_given: int, requested: str | None = None) -> dict:
    """``input`` block of a slice: ``image`` is the (H, W, 3) array the model gets,
    ``channels_given`` how many channels the file had (1 grey, 3 or 4 colour)."""
    grey = channels_given == 1
    condition = "flair_only" if grey else channel_condition(image)
    block = input_block(condition, sequence=requested, requested=requested, what="image", grey=grey)
    block["channels_given"] = int(channels_given)
    return block


def describe_volume(vol, requested: str | None = None) -> dict:
    """``input`` block of a ``volumes.Volume`` (its condition, file-name sequence and notes)."""
    grey = vol.channels_given == 1
    notes = list(vol.notes)
    sequence = requested
    if vol.name_sequence is not None:  # the file name says which sequence it is
        sequence = vol.name_sequence
        if requested is not None and requested != sequence and vol.condition == "flair_only":
            notes.append(f"sequence '{requested}' ignored: the file name says {SEQUENCES[sequence]}")
            requested = None
    block = input_block(vol.condition, sequence=sequence, requested=requested, what="volume", grey=grey, notes=notes)
    block["channels_given"] = int(vol.channels_given)
    if vol.present:
        block["sequences_present"] = list(vol.present)
    return block
