"""Shared pieces of the tests on the VLM families: skip marks and random images (the tiny pairs are the
`pairs` fixture of conftest.py)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from compodistill.models.families import FAMILIES


def missing_marks(name: str) -> list:
    """A skip mark, with the reason, where the family's processor needs a package not installed here."""
    missing = FAMILIES[name].missing_requirements()
    return [pytest.mark.skip(reason=f"{name}'s processor needs {', '.join(missing)}, not installed")] if missing else []


def random_image(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)
