"""Loading images for the vision tower: missing and corrupt files become `BadSample` errors naming the
sample, and pre-processing is always the vision tower's own image processor."""
from __future__ import annotations

import os

from .chat import BadSample


def resolve_image(image_folder: str, relative: str, sample_id=None) -> str:
    """The image's path under `image_folder` (LLaVA stores paths relative to an image folder)."""
    if not isinstance(relative, str) or not relative:
        raise BadSample(sample_id, "missing image", f"image field {relative!r}")
    path = os.path.join(image_folder, relative)
    if not os.path.isfile(path):
        raise BadSample(sample_id, "missing image", path)
    return path


def load_image(path: str, sample_id=None):
    """Open and fully decode an image as RGB; truncated or unreadable files raise BadSample."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except FileNotFoundError:
        raise BadSample(sample_id, "missing image", path) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise BadSample(sample_id, "corrupt image", f"{path}: {err}") from None


def pixel_values(image_processor, images):
    """(N, 3, H, W) float tensor from PIL images, through the vision tower's processor."""
    return image_processor(images=images, return_tensors="pt")["pixel_values"]
