"""Vision features computed once per image, for stages whose vision tower is frozen.

The tower of a LLaVA is frozen in every distillation stage (as in the paper), so the features it gives
an image never change during a run. `VisionFeatureCache.fill` runs the tower once over every image a
dataset uses, in batches, and keeps the (N, D) features per image in memory; a dataset with a cache
attached then yields those features instead of decoding and preprocessing the image again, and the model
runs from them (`compodistill.models.vision.multimodal_embeddings`), with the same result.

Memory: images × N × D × bytes of the tower's dtype (the miniature's 20,000 images × 16 × 64 in float32:
82 MB; LLaVA-665K at 729 × 1152 in bf16 would be about 1.1 TB, so real runs leave the cache off).
The cache is keyed by the tower's fingerprint: it refuses a model whose tower or image processing differs.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..models.vision import tower_fingerprint, vision_features
from .chat import BadSample
from .images import load_image, pixel_values


class VisionFeatureCache:
    """{image path: (N, D) features} of one frozen vision tower (identified by `fingerprint`)."""

    def __init__(self, mllm):
        self.fingerprint = tower_fingerprint(mllm)
        self._features: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._features)

    def __contains__(self, path: str) -> bool:
        return path in self._features

    def __getitem__(self, path: str) -> torch.Tensor:
        return self._features[path]

    def check(self, mllm, argument: str = "model") -> None:
        """Raise a ValueError unless `mllm` has the tower these features came from."""
        if tower_fingerprint(mllm) != self.fingerprint:
            raise ValueError(f"{argument}: its vision tower (or image processing) differs from the one the cached "
                             f"features come from; one cache serves one tower")

    @torch.no_grad()
    def fill(self, mllm, images: list[tuple[str, str]], *, device=None, batch_size: int = 64,
             progress: bool = True, on_bad_sample: str = "raise") -> list[str]:
        """Compute the features of every (sample_id, path) not cached yet. Returns the sample ids whose
        image could not be read (only with on_bad_sample="skip"; "raise" raises `BadSample` naming it)."""
        self.check(mllm)
        model = mllm.model
        device = torch.device(device) if device is not None else next(model.parameters()).device
        todo = list({path: sample_id for sample_id, path in images if path not in self._features}.items())
        bad = []
        for start in tqdm(range(0, len(todo), batch_size), desc="vision features", disable=not progress or not todo):
            chunk, loaded = todo[start:start + batch_size], []
            for path, sample_id in chunk:
                try:
                    loaded.append((path, load_image(path, sample_id)))
                except BadSample:
                    if on_bad_sample == "raise":
                        raise
                    bad.append(sample_id)
            if not loaded:
                continue
            pixels = pixel_values(mllm.image_processor, [image for _, image in loaded]).to(device)
            features = vision_features(model, pixels).cpu()
            for (path, _), feature in zip(loaded, features):
                self._features[path] = feature.clone()
        return bad
