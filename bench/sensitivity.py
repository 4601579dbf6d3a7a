"""How chaotic is a BatchNorm-calibrated random NASNet? Top-1 agreement and feature change
under +-1 LSB pixel noise, per separable-branch BatchNorm scale (the demo uses 0.1).

Usage: python bench/sensitivity.py ARCH N_IMAGES SCALES     e.g.  tiny 64 1.0,0.3,0.1,0.03
"""
import sys, numpy as np, torch, os
from nasq.demo import make_images, _features
from nasq.model.checkpoint import build_model
from nasq.data import preprocess_u8, normalize_u8
from nasq.model.spec import ARCHS
arch = sys.argv[1]; n = int(sys.argv[2])
folder = f"/tmp/chaos-{arch}"; names = make_images(folder, n, seed=5) if not os.path.isdir(folder) else sorted(os.listdir(folder))
crops = np.stack([preprocess_u8(os.path.join(folder, x)) for x in names])
rng = np.random.default_rng(0)
noisy = np.clip(crops.astype(int) + rng.integers(-1, 2, crops.shape), 0, 255).astype(np.uint8)
torch.set_num_threads(2)
for g in [float(x) for x in sys.argv[3].split(",")]:
    torch.manual_seed(0)
    m = build_model(ARCHS[arch], 1001)
    from pretrainedmodels.models import nasnet as N
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d): mod.reset_running_stats(); mod.momentum=None
        if isinstance(mod, (N.BranchSeparables, N.BranchSeparablesStem)): mod.bn_sep_2.weight.data.fill_(g)
    m.train()
    with torch.no_grad():
        for i in range(0, min(32,n), 8): m.features(torch.from_numpy(normalize_u8(crops[i:i+8])))
    m.eval()
    fa = torch.cat([_features(m, torch.from_numpy(normalize_u8(crops[i:i+8]))) for i in range(0, n, 8)])
    fb = torch.cat([_features(m, torch.from_numpy(normalize_u8(noisy[i:i+8]))) for i in range(0, n, 8)])
    mu, sd = fa.mean(0), fa.std(0)+1e-3
    w = torch.randn(1001, fa.shape[1], generator=torch.Generator().manual_seed(1)) / sd / fa.shape[1]**0.5
    b = -(w @ mu); la, lb = fa @ w.T + b, fb @ w.T + b
    s = 4 / la.std(); la, lb = la*s, lb*s
    agree = (la.argmax(1) == lb.argmax(1)).float().mean().item()
    rel = ((fa-fb).norm(dim=1)/ (fa-mu).norm(dim=1)).mean().item()
    print(f"gamma {g}: top1 agreement under +-1 LSB noise {agree:.3f}, feature change/spread {rel:.3f}, distinct classes {len(set(la.argmax(1).tolist()))}/{n}", flush=True)
