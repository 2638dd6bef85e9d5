"""`python -m compodistill.distill_vlm`: distil a teacher into a student of any supported VLM family.

    python -m compodistill.distill_vlm --teacher T --student S --data train.json --images IMAGES --output OUT
    python -m compodistill.distill_vlm --tiny qwen2_5_vl --output runs/tiny-qwen2_5_vl   # offline smoke run

Teacher and student are local checkpoint folders that `AutoModelForImageTextToText` / `AutoProcessor`
load (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision, LLaVA-1.5, InternVL, Idefics3, SmolVLM); the data
is a LLaVA JSON file whose images may be several per sample and of any size. Before the first step the
pair is checked on a real batch (`models.pairing.check_pair`). Each step is the distilled fine-tuning
loss lm + kd + vat (weights from --losses), with the visual attention aligned inside the attention
kernels. The student is written with save_pretrained, with its processor, to OUT/final (through a
temporary folder renamed into place, so OUT/final is never half written).

--tiny FAMILY builds a tiny random teacher/student pair of the family and a small generated data set
(coloured shapes, mixed image sizes, some samples with two images) under OUT, then distils on them: a
check of the whole path on a CPU in seconds, not a model worth keeping.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys

import torch
from tqdm.auto import tqdm

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SIZES = ((64, 64), (128, 96), (96, 128), (128, 32))


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m compodistill.distill_vlm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", help="teacher checkpoint folder")
    parser.add_argument("--student", help="student checkpoint folder")
    parser.add_argument("--data", help="LLaVA JSON (array or JSON Lines)")
    parser.add_argument("--images", help="folder the data's image paths are relative to")
    parser.add_argument("--tiny", metavar="FAMILY", help="build a tiny pair and data of FAMILY under --output")
    parser.add_argument("--output", required=True, help="run folder; the student goes to OUTPUT/final")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--losses", default="lm=1,kd=1,vat=1", help="loss weights, e.g. lm=1,kd=1,vat=0.5")
    parser.add_argument("--student-layers", default="intermediate", help="VAT student layers: a preset or 0,1,2")
    parser.add_argument("--teacher-layers", default="intermediate", help="VAT teacher layers: a preset or 1,2,3")
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"))
    parser.add_argument("--seed", type=int, default=0)
    return parser


def _weights(text: str) -> dict:
    weights = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep or name.strip() not in ("lm", "kd", "vat"):
            raise ValueError(f"--losses: expected name=weight items with names lm, kd, vat, got {item!r}")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--losses: {name.strip()}'s weight {value!r} is not a number") from None
    return weights


def _layers(text: str):
    if all(part.strip().isdigit() for part in text.split(",")):
        return [int(part) for part in text.split(",")]
    return text


def write_tiny_data(folder: str, *, samples: int = 16, seed: int = 0) -> tuple[str, str]:
    """A small LLaVA JSON of coloured shapes (one or two images, mixed sizes) under `folder`; returns
    (json path, image folder)."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    images = os.path.join(folder, "images")
    os.makedirs(images, exist_ok=True)
    records = []
    for index in range(samples):
        names = []
        colors = [rng.choice(sorted(COLORS)) for _ in range(1 + index % 2)]
        for k, color in enumerate(colors):
            width, height = rng.choice(SIZES)
            image = Image.new("RGB", (width, height), (250, 250, 250))
            box = (width // 4, height // 4, 3 * width // 4, 3 * height // 4)
            ImageDraw.Draw(image).ellipse(box, fill=COLORS[color])
            name = f"{index:03d}_{k}.png"
            image.save(os.path.join(images, name))
            names.append(name)
        question = "<image>\nWhat color is the shape?" if len(names) == 1 else \
            "<image>\n<image>\nWhat colors are the two shapes?"
        records.append({"id": f"tiny-{index:03d}", "image": names, "conversations": [
            {"from": "human", "value": question}, {"from": "gpt", "value": " and ".join(colors) + "."}]})
    path = os.path.join(folder, "train.json")
    with open(path, "w") as f:
        json.dump(records, f, indent=1)
    return path, images


def _save_atomically(model, processor, path: str) -> None:
    temporary = path + ".tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(temporary)
    processor.save_pretrained(temporary)
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.replace(temporary, path)


def run(args) -> dict:
    from .distill import DistillConfig, Distiller, KDConfig, VATConfig
    from .data.processor_data import ProcessorCollator, ProcessorDataset
    from .models.families import load_vlm
    from .models.pairing import check_pair

    if args.steps < 1 or args.batch_size < 1:
        raise ValueError(f"--steps and --batch-size: expected >= 1, got {args.steps} and {args.batch_size}")
    if not math.isfinite(args.lr) or args.lr <= 0:
        raise ValueError(f"--lr: expected > 0, got {args.lr}")
    os.makedirs(args.output, exist_ok=True)
    if args.tiny:
        from .models.tiny_families import build_tiny_pair

        args.teacher, args.student = build_tiny_pair(args.tiny, os.path.join(args.output, "models"), seed=args.seed)
        args.data, args.images = write_tiny_data(os.path.join(args.output, "data"), seed=args.seed)
    missing = [name for name in ("teacher", "student", "data", "images") if not getattr(args, name)]
    if missing:
        raise ValueError(f"--{', --'.join(missing)}: required unless --tiny is given")
    torch.manual_seed(args.seed)
    teacher, student = load_vlm(args.teacher), load_vlm(args.student)
    dataset = ProcessorDataset(args.data, args.images)
    collator = ProcessorCollator(student.processor, student.family.image_token_ids(student.model.config))
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, collate_fn=collator,
                                         generator=torch.Generator().manual_seed(args.seed))
    config = DistillConfig(weights=_weights(args.losses), kd=KDConfig(),
                           vat=VATConfig(student_layers=_layers(args.student_layers),
                                         teacher_layers=_layers(args.teacher_layers)))
    first = next(iter(loader))
    if config.needs_teacher:
        check_pair(student.model, teacher.model, first)
    distiller = Distiller(student.model, teacher.model if config.needs_teacher else None, config,
                          backend=args.backend).train()
    optimizer = torch.optim.AdamW([p for p in distiller.parameters() if p.requires_grad], lr=args.lr)
    print(distiller.describe())
    history, step = [], 0
    with tqdm(total=args.steps, desc="distil", unit="step") as bar:
        while step < args.steps:
            for batch in ([first] if step == 0 else loader):
                losses = distiller(batch)
                if not torch.isfinite(losses["loss"]):
                    raise RuntimeError(f"step {step}: the loss is not finite ({ {k: float(v) for k, v in losses.items()} })")
                optimizer.zero_grad(set_to_none=True)
                losses["loss"].backward()
                optimizer.step()
                history.append({name: float(value.detach()) for name, value in losses.items()})
                step += 1
                bar.update(1)
                bar.set_postfix({name: f"{value:.4g}" for name, value in history[-1].items()})
                if step >= args.steps:
                    break
    final = os.path.join(args.output, "final")
    _save_atomically(distiller.student, student.processor, final)
    with open(os.path.join(args.output, "losses.json"), "w") as f:
        json.dump(history, f, indent=1)
    print(f"student written to {final}; first loss {history[0]['loss']:.4f}, last {history[-1]['loss']:.4f}")
    return {"history": history, "final": final}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
