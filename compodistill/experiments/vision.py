"""A vision tower that sees the miniature's scenes, as a real LLaVA starts from a pre-trained SigLIP.

The tiny SigLIP of the miniature presets has one patch per grid cell (image 64 px, patch 16 px, 4×4
cells). It is trained here, before any language model sees it, to tell each patch's object: linear
heads read the feature LLaVA feeds its projector (the vision feature layer) and predict the colour,
the shape and the size of the object in that patch (class 0: an empty cell). The heads are dropped
afterwards and the tower is frozen in every later stage, so its features encode each cell's attributes
linearly and never change. A penalty (mean(h²) − 1)² keeps the features at unit mean square.
"""
from __future__ import annotations

import json
import math
import os

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.images import load_image, pixel_values
from ..models import parts

ATTRIBUTES = ("color", "shape", "size")


def read_scenes(data_dir: str, split: str = "train") -> list[dict]:
    with open(os.path.join(data_dir, "scenes", f"{split}.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def patch_targets(scene: dict, vocabulary: dict, patches_per_side: int) -> torch.Tensor:
    """(3, P) class indices per patch: colour, shape and size of the patch's object, 0 for an empty cell.

    `vocabulary` maps "colors", "shapes" and "sizes" to word lists. The scene's grid must equal the
    tower's patches per side, so that each object fills exactly one patch."""
    if scene["grid"] != patches_per_side:
        raise ValueError(f"scene {scene['id']}: grid {scene['grid']} must equal the vision tower's patches per "
                         f"side ({patches_per_side}) so that each object fills one patch")
    target = torch.zeros(len(ATTRIBUTES), patches_per_side * patches_per_side, dtype=torch.long)
    for obj in scene["objects"]:
        row, col = obj["cell"]
        cell = row * patches_per_side + col
        for k, (attribute, words) in enumerate(zip(ATTRIBUTES, ("colors", "shapes", "sizes"))):
            target[k, cell] = 1 + vocabulary[words].index(obj[attribute])
    return target


def pretrain_vision_tower(mllm, data_dir: str, vocabulary: dict, *, steps: int, batch_size: int = 64,
                          lr: float = 2e-3, seed: int = 0, progress: bool = True) -> dict:
    """Train `mllm`'s vision tower in place on the training scenes of `data_dir` (see the module doc).

    Returns {"loss", "steps", "accuracy": {attribute: per-patch accuracy on the last batch}}."""
    scenes = read_scenes(data_dir, "train")
    vision_config = parts.base_model(mllm).config.vision_config
    side = vision_config.image_size // vision_config.patch_size
    targets = torch.stack([patch_targets(s, vocabulary, side) for s in scenes])
    images = pixel_values(mllm.image_processor,
                          [load_image(os.path.join(data_dir, "images", s["image"]), s["id"]) for s in scenes])
    tower = parts.vision_tower(mllm)
    layer = parts.base_model(mllm).config.vision_feature_layer
    classes = [1 + len(vocabulary[words]) for words in ("colors", "shapes", "sizes")]
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        heads = torch.nn.ModuleList(torch.nn.Linear(vision_config.hidden_size, k) for k in classes)
    optimizer = torch.optim.AdamW(list(tower.parameters()) + list(heads.parameters()), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    tower.requires_grad_(True)
    tower.train()
    record = {}
    for step in tqdm(range(steps), desc="vision pre-training", disable=not progress):
        idx = torch.randint(0, len(scenes), (batch_size,), generator=generator)
        features = tower(images[idx], output_hidden_states=True).hidden_states[layer]
        logits = [head(features) for head in heads]
        classification = sum(F.cross_entropy(lg.flatten(0, 1), targets[idx, k].flatten())
                             for k, lg in enumerate(logits))
        loss = classification + 0.1 * (features.pow(2).mean() - 1.0).pow(2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step == steps - 1:
            record = {"loss": loss.item(), "steps": steps,
                      "accuracy": {name: (lg.argmax(-1) == targets[idx, k]).float().mean().item()
                                   for k, (name, lg) in enumerate(zip(ATTRIBUTES, logits))}}
    tower.eval()
    tower.requires_grad_(False)
    if not all(torch.isfinite(p).all() for p in tower.parameters()):
        raise FloatingPointError("vision pre-training produced non-finite weights")
    return record
