"""Device-side JPEG decode + resize (torchvision) vs Pillow: top-1 agreement, score and pixel
differences, on the CPU. Usage: python bench/decode_agreement.py CHECKPOINT DATA_DIR LABELS"""
import numpy as np
from nasq import backends
from nasq.data import open_source, read_labels
from nasq.config import BackendOptions
from nasq.inference.evaluate import evaluate_range
from nasq.model.spec import ModelRef
import sys
ck, data, lab = sys.argv[1:4]
src = open_source(data); labels = read_labels(lab) if lab != "-" else None
a = backends.create("torch", "cpu"); a.load(ModelRef(ck), batch_size=4)
b = backends.create("torch", "cpu"); b.load(ModelRef(ck), batch_size=4, options=BackendOptions(device_decode=True))
ra = evaluate_range(src, a, 0, len(src), batch_size=4, labels=labels)
rb = evaluate_range(src, b, 0, len(src), batch_size=4, labels=labels)
print("errors", [e["name"][-10:] for e in ra["errors"]], [e["name"][-10:] for e in rb["errors"]])
print("names equal", ra["names"] == rb["names"])
t1 = np.mean([x[0] == y[0] for x, y in zip(ra["top5"], rb["top5"])])
print("top1 agreement", t1, "max score diff", np.abs(np.array(ra["scores"]) - np.array(rb["scores"])).max())
# pixel-level
import torch
from nasq.data import preprocess_u8
import os
diffs=[]
for n in src.names[:10]:
    p=os.path.join(data,n)
    try: pil = preprocess_u8(p)
    except Exception: continue
    from torchvision.io import decode_jpeg, ImageReadMode
    im = decode_jpeg(torch.frombuffer(bytearray(open(p,'rb').read()), dtype=torch.uint8), mode=ImageReadMode.RGB)
    t = b._resize_crop(im).permute(1,2,0).numpy()
    diffs.append(np.abs(t - pil.astype(np.float32)).max()); 
print("max pixel diff per image", diffs)
