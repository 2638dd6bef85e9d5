"""Fixtures of the library tests."""
from __future__ import annotations

import pytest

from compodistill.models.families import load_vlm
from compodistill.models.tiny_families import build_tiny_pair


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """family → (teacher VLM, student VLM, teacher folder), built and loaded once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            teacher_path, student_path = build_tiny_pair(name, tmp_path_factory.mktemp(name))
            cache[name] = (load_vlm(teacher_path), load_vlm(student_path), teacher_path)
        return cache[name]

    return get
