"""The vision side of a LLaVA, split where a frozen tower can be cached.

    features = vision_features(model, pixel_values)            # tower + feature selection, no projector
    embeds = multimodal_embeddings(model, input_ids, features)  # projector, then into the token sequence

`vision_features` is exactly the part of transformers' LlavaModel.get_image_features that comes before
the projector (the hidden state of `vision_feature_layer`, or several concatenated, with the CLS slot
dropped under the "default" select strategy). When the tower is frozen its output never changes, so it
can be computed once per image (`compodistill.data.features.VisionFeatureCache`) and the model run from
`multimodal_embeddings(...)` as `inputs_embeds`, which gives the same result as passing pixel_values.
"""
from __future__ import annotations

import hashlib
import json

import torch

from . import parts


def vision_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, N, D) vision-tower features of (B, 3, H, W) images, as the projector receives them."""
    base = parts.base_model(model)
    config = base.config
    tower = parts.vision_tower(base)
    dtype = next(tower.parameters()).dtype
    outputs = tower(pixel_values.to(dtype), output_hidden_states=True, return_dict=True)
    layers = config.vision_feature_layer
    selected = [outputs.hidden_states[layer] for layer in ([layers] if isinstance(layers, int) else layers)]
    if config.vision_feature_select_strategy == "default":
        selected = [hidden[:, 1:] for hidden in selected]
    return selected[0] if len(selected) == 1 else torch.cat(selected, dim=-1)


def multimodal_embeddings(model, input_ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """(B, L, H) input embeddings with the projected `features` (B, N, D) in place of the image tokens.

    Every sample must hold exactly N image tokens (one image)."""
    base = parts.base_model(model)
    embed = base.get_input_embeddings()
    embeds = embed(input_ids)
    image = input_ids == base.config.image_token_id
    counts = image.sum(1)
    if features.ndim != 3 or features.shape[0] != input_ids.shape[0] or bool((counts != features.shape[1]).any()):
        raise ValueError(f"vision_features: expected (B={input_ids.shape[0]}, N, D) with N equal to every "
                         f"sample's image-token count {counts.tolist()}, got shape {tuple(features.shape)}")
    projected = parts.projector(base)(features.to(embeds.dtype))
    return embeds.masked_scatter(image[..., None], projected.to(embeds.dtype))


def tower_fingerprint(mllm) -> str:
    """A digest of everything that determines the tower's features of an image file: the tower's
    weights, the feature layer and select strategy, and the image processor's settings."""
    base = parts.base_model(mllm)
    digest = hashlib.sha256()
    for name, tensor in sorted(parts.vision_tower(base).state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    settings = {"layer": base.config.vision_feature_layer, "strategy": base.config.vision_feature_select_strategy,
                "processor": mllm.image_processor.to_dict() if hasattr(mllm, "image_processor") else None}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]
