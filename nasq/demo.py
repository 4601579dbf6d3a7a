"""A self-contained demo: generated images, a calibrated random-weight checkpoint, a real run.

Nothing is downloaded. The images are procedural "photos" (smooth backgrounds, lit shapes,
texture, blur) of varied sizes and aspect ratios. The checkpoint is Cadene's NASNet-A in
the exact ``nasnetalarge-a1897284.pth`` format (1001 outputs, background at 0) with random
weights, whose BatchNorm statistics are calibrated on these images and whose classifier is
centered and scaled on their features, so that predictions differ from image to image.
Each image is labelled with the fp32 reference model's top-1, so a correct pipeline scores
~100 % top-1 -- and any mix-up of images, labels or outputs shows.
"""
from __future__ import annotations

import os

import numpy as np

from .config import DEFAULT_BATCH_SIZE
from .data import normalize_u8, preprocess_u8
from .files import atomic_write, write_json
from .model.spec import ARCHS, BACKGROUND_OUTPUTS


def make_image(rng: np.random.Generator, width: int, height: int):
    """One natural-looking RGB image (PIL)."""
    from PIL import Image, ImageDraw, ImageFilter

    # Low-frequency background: bilinear upsampling of a coarse random grid, plus a light gradient.
    coarse = rng.uniform(0, 255, size=(rng.integers(2, 6), rng.integers(2, 6), 3)).astype(np.uint8)
    bg = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    img = bg.copy()
    draw = ImageDraw.Draw(img, "RGBA")
    for _ in range(rng.integers(3, 12)):
        x0, y0 = rng.uniform(-0.2, 1.0) * width, rng.uniform(-0.2, 1.0) * height
        w, h = rng.uniform(0.05, 0.6) * width, rng.uniform(0.05, 0.6) * height
        color = tuple(int(c) for c in rng.integers(0, 256, 3)) + (int(rng.integers(120, 256)),)
        kind = rng.integers(0, 3)
        if kind == 0:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=color)
        elif kind == 1:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=color)
        else:
            pts = [(x0 + rng.uniform(0, w), y0 + rng.uniform(0, h)) for _ in range(rng.integers(3, 7))]
            draw.polygon(pts, fill=color)
    for _ in range(rng.integers(0, 20)):  # thin structures: branches, wires, edges
        pts = [(rng.uniform(0, width), rng.uniform(0, height)) for _ in range(2)]
        draw.line(pts, fill=tuple(int(c) for c in rng.integers(0, 256, 3)) + (200,), width=int(rng.integers(1, 6)))
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 2.0)))
    arr = np.asarray(img).astype(np.float32)
    arr += rng.normal(0, rng.uniform(2, 10), arr.shape)  # sensor noise / texture
    shade = np.linspace(rng.uniform(0.7, 1.0), rng.uniform(0.9, 1.2), width)[None, :, None]  # lighting
    return Image.fromarray(np.clip(arr * shade, 0, 255).astype(np.uint8))


def make_images(folder: str, n: int, *, seed: int = 0) -> list[str]:
    """Write ``n`` JPEGs named like ImageNet val (``ILSVRC2012_val_00000001.JPEG``)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for i in range(1, n + 1):
        long, aspect = int(rng.integers(250, 640)), rng.uniform(0.55, 1.0)
        w, h = (long, int(long * aspect)) if rng.random() < 0.7 else (int(long * aspect), long)
        name = f"ILSVRC2012_val_{i:08d}.JPEG"
        make_image(rng, w, h).save(os.path.join(folder, name), quality=int(rng.integers(80, 96)))
        names.append(name)
    return names


def _features(model, x):
    import torch

    with torch.inference_mode():
        f = model.relu(model.features(x))
        return model.avg_pool(f).flatten(1)


def make_checkpoint(path: str, image_folder: str, names: list[str], *, arch: str = "large", seed: int = 0,
                    batch_size: int = DEFAULT_BATCH_SIZE, calib_images: int = 32, logit_std: float = 4.0, labels: bool = True,
                    branch_scale: float = 0.1, log=print) -> np.ndarray | None:
    """Save a calibrated random-weight checkpoint; return the fp32 reference top-1 labels.

    The reference labels come from the same model on the same batches (``batch_size``
    windows over the sorted names) that an evaluation uses. ``labels=False`` calibrates on
    the first ``calib_images`` only and returns None (for large image sets labelled elsewhere).
    """
    import torch

    from .model.checkpoint import build_model

    torch.manual_seed(seed)
    model = build_model(ARCHS[arch], BACKGROUND_OUTPUTS)
    if not labels:
        names = names[:calib_images]
    crops = np.stack([preprocess_u8(os.path.join(image_folder, n)) for n in names])
    # 1. BatchNorm statistics: a cumulative average over the calibration images in train mode.
    from .model.cadene import nasnet as cadene_nasnet

    nasnet = cadene_nasnet()

    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
        if isinstance(m, (nasnet.BranchSeparables, nasnet.BranchSeparablesStem)):
            with torch.no_grad():
                m.bn_sep_2.weight.fill_(branch_scale)
    model.train()
    calib = crops[: max(2, min(calib_images, len(crops)))]
    log(f"calibrating BatchNorm statistics on {len(calib)} images ...")
    with torch.no_grad():
        for i in range(0, len(calib), 8):
            model.features(torch.from_numpy(normalize_u8(calib[i:i + 8])))
    model.eval()
    # 2. Features of every image, in the evaluation's batches.
    log(f"computing reference features of {len(crops)} images ...")
    feats = torch.cat([_features(model, torch.from_numpy(normalize_u8(crops[i:i + batch_size])))
                       for i in range(0, len(crops), batch_size)])
    # 3. A classifier centered and scaled on those features: random directions in the
    #    standardized feature space, so the arg-max changes from image to image.
    mu, sd = feats.mean(0), feats.std(0) + 1e-3
    g = torch.Generator().manual_seed(seed + 1)
    w = torch.randn(BACKGROUND_OUTPUTS, feats.shape[1], generator=g) / sd / feats.shape[1] ** 0.5
    b = -(w @ mu)
    scale = logit_std / (feats @ w.T + b).std()
    w, b = w * scale, b * scale
    w[0], b[0] = 0.0, -100.0  # background never wins
    with torch.no_grad():
        model.last_linear.weight.copy_(w)
        model.last_linear.bias.copy_(b)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda f: torch.save(model.state_dict(), f))
    if not labels:
        return None
    # Labels from the model as saved: the head applied per evaluation batch, as model(x) does.
    with torch.inference_mode():
        logits = torch.cat([model.last_linear(feats[i:i + batch_size]) for i in range(0, len(feats), batch_size)])
    return (logits.argmax(1) - 1).numpy()


def prepare(workdir: str, n_images: int, *, arch: str = "large", batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0,
            labels: bool = True, log=print) -> dict:
    """Images, checkpoint and val_label.txt in ``workdir``; reused when already there.
    ``labels=False``: no val_label.txt (the caller labels the images itself)."""
    images = os.path.join(workdir, "val")
    ckpt = os.path.join(workdir, f"nasnetalarge-random-{arch}.pth")
    stamp = os.path.join(workdir, ".demo.json")
    want = {"images": n_images, "arch": arch, "batch_size": batch_size, "seed": seed, "labels": labels,
            "checkpoint": "calibrated, branch_scale 0.1"}  # a change of recipe invalidates old demo folders
    import json

    label_file = os.path.join(workdir, "val_label.txt")
    if (os.path.isfile(stamp) and json.load(open(stamp)) == want and os.path.isfile(ckpt)
            and (os.path.isfile(label_file) or not labels)):
        log(f"reusing the demo data in {workdir}")
        return {"data": images, "weights": ckpt, "labels": label_file if labels else None}
    log(f"generating {n_images} images in {images} ...")
    names = make_images(images, n_images, seed=seed)
    top1 = make_checkpoint(ckpt, images, names, arch=arch, seed=seed, batch_size=batch_size, labels=labels, log=log)
    if labels:
        with open(label_file, "w") as f:
            f.writelines(f"{n} {int(c)}\n" for n, c in zip(names, top1))
        log(f"{len(set(top1.tolist()))} distinct reference classes among {n_images} images")
    write_json(want, stamp)
    return {"data": images, "weights": ckpt, "labels": label_file if labels else None}
