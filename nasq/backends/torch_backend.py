"""PyTorch on CPU or CUDA.

fp32 runs the module as loaded (the reference). On CUDA, fp16 and bf16 take the fast path:
BatchNorm folded into the convolutions, channels-last memory format, uint8 input normalized
on the device, pinned host buffers, and optionally torch.compile (its cache kept in
``BackendOptions.cache_dir`` so a worker does not recompile on every start) and CUDA graphs
per batch size. Everything comes from the ``BackendOptions`` handed to ``load``.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from ..config import BackendOptions
from ..errors import BackendError
from ..model.spec import PREPROCESS, ModelRef
from .base import Backend


class TorchBackend(Backend):
    name = "torch"
    runtime = ("torch", "torch")
    artifact_suffixes = (".pth", ".pt")
    device_kinds = ("cpu", "cuda")
    precisions = ("fp32", "fp16", "bf16")
    compile_modes = ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

    def load(self, model: ModelRef, *, batch_size: int, options: BackendOptions = BackendOptions()) -> None:
        import torch

        from ..model.checkpoint import load_model

        self.check_options(options)
        precision = options.precision
        cuda = self.device.startswith("cuda")
        if cuda and not torch.cuda.is_available():
            raise BackendError(f"torch backend: device {self.device} requested but CUDA is not available "
                               f"(torch {torch.__version__}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
        if not (self.device == "cpu" or cuda):
            raise BackendError(f"torch backend runs on cpu or cuda:N, not {self.device!r}")
        if options.device_decode:
            try:
                import torchvision.io  # noqa: F401 - decode_jpeg, on this torch build
            except Exception as e:  # noqa: BLE001 - a torchvision built for another torch fails in many ways
                raise BackendError(f"--device-decode needs a torchvision built for this torch ({torch.__version__}): "
                                   f"{type(e).__name__}: {e}; install the torchvision of the same index as torch "
                                   "(README: Install by role)") from None
        if precision != "fp32" and not cuda:
            raise BackendError(f"torch backend: {precision} runs on CUDA only; use fp32 on the CPU")
        fast = cuda and precision != "fp32"
        if options.kernels not in ("torch", "triton"):
            raise BackendError(f"torch backend: kernels must be torch or triton, not {options.kernels!r}")
        if options.kernels == "triton":
            from ..model import triton_sep

            why = triton_sep.available()
            if why:
                raise BackendError(f"torch backend: --kernels triton: {why}")
            if options.fold_bn is False:
                raise BackendError("torch backend: --kernels triton needs BatchNorm folded (fold_bn)")
        opts = dataclasses.replace(options, fold_bn=fast or options.kernels == "triton" if options.fold_bn is None
                                   else options.fold_bn,
                                   channels_last=fast if options.channels_last is None else options.channels_last)
        self.options, self.precision = opts, precision
        net, info = load_model(model.weights, model.num_outputs)
        if opts.fold_bn:
            from ..model.fold import fold_batchnorm

            fold_batchnorm(net)
        if opts.kernels == "triton":
            self.fused_branches = triton_sep.fuse_separables(net)  # 2 kernels per branch
        self._dev = torch.device(self.device)
        self._dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        self._fmt = torch.channels_last if opts.channels_last else torch.contiguous_format
        net = net.to(self._dev, self._dtype).to(memory_format=self._fmt).eval()
        if cuda:
            torch.backends.cudnn.benchmark = True
        if opts.compile != "none":
            import torch._inductor.config as inductor

            if opts.cache_dir:  # kept beside the artifacts: a restarted worker reuses compiled kernels
                os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", opts.cache_dir)
            inductor.freezing = True  # constant-fold weights (BatchNorm folding included)
            net = torch.compile(net, mode=None if opts.compile == "default" else opts.compile, dynamic=False)
        self._net = net
        self._graphs: dict[int, tuple] = {}
        self._pinned: dict[int, object] = {}
        self.num_outputs = info.num_outputs
        self.model_info = {**info.to_dict(), "precision": precision, "options": opts.describe()}
        if opts.kernels == "triton":
            self.model_info["fused_separable_branches"] = self.fused_branches
        shape = (1, 3, 1, 1)
        self._mean = torch.tensor(PREPROCESS.mean, dtype=torch.float32, device=self._dev).view(shape)
        self._std = torch.tensor(PREPROCESS.std, dtype=torch.float32, device=self._dev).view(shape)

    # ---------------------------------------------------------------- device-side pieces
    def _forward_u8(self, x_u8):
        """uint8 NHWC on the device -> logits (fp32). Normalization in fp32, then the model's dtype."""
        x = x_u8.permute(0, 3, 1, 2).float().div_(255.0).sub_(self._mean).div_(self._std)
        x = x.to(self._dtype).contiguous(memory_format=self._fmt)
        return self._net(x).float()

    def _graph(self, bs: int):
        """A CUDA graph of _forward_u8 for batch size ``bs`` (captured on first use)."""
        import torch

        if bs not in self._graphs:
            static = torch.zeros((bs, PREPROCESS.crop, PREPROCESS.crop, 3), dtype=torch.uint8, device=self._dev)
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s), torch.inference_mode():
                for _ in range(3):
                    self._forward_u8(static)
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g), torch.inference_mode():
                out = self._forward_u8(static)
            _bounded(self._graphs)
            self._graphs[bs] = (g, static, out)
        return self._graphs[bs]

    def _to_device_u8(self, batch: np.ndarray):
        import torch

        t = torch.from_numpy(np.ascontiguousarray(batch))
        if self._dev.type != "cuda":
            return t
        n = len(batch)
        buf = self._pinned.get(n)
        if buf is None:
            _bounded(self._pinned)
            buf = self._pinned[n] = torch.empty(t.shape, dtype=torch.uint8).pin_memory()
        buf.copy_(t)
        return buf.to(self._dev, non_blocking=True)

    @property
    def decodes_jpeg(self) -> bool:
        return self.options.device_decode

    def _resize_crop(self, img):
        """CHW uint8 on the device -> the seed's 331 crop (float 0..255): shorter side to 378 with
        antialiased bilinear (torch's antialias follows PIL's filter), rounded like PIL's uint8."""
        import torch.nn.functional as F

        from ..data.transforms import resized_size

        h, w = img.shape[1:]
        nw, nh = resized_size(w, h, PREPROCESS.resize)
        x = F.interpolate(img[None].float(), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        top, left = int(round((nh - PREPROCESS.crop) / 2.0)), int(round((nw - PREPROCESS.crop) / 2.0))
        return x[0, :, top:top + PREPROCESS.crop, left:left + PREPROCESS.crop].round_().clamp_(0, 255)

    def predict_encoded(self, datas: list[bytes]) -> np.ndarray:
        """JPEG bytes -> logits, decoded on the device (nvjpeg on CUDA). Raises on any
        undecodable file; the caller falls back to the per-image CPU path for reasons."""
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        with torch.inference_mode():
            raw = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
            imgs = decode_jpeg(raw, mode=ImageReadMode.RGB, device=self._dev)
            x = torch.stack([self._resize_crop(im) for im in imgs])
            x = x.div_(255.0).sub_(self._mean).div_(self._std).to(self._dtype).contiguous(memory_format=self._fmt)
            return self._net(x).float().cpu().numpy()

    # ---------------------------------------------------------------- the contract
    def predict_u8(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            x = self._to_device_u8(batch)
            if self.options.cuda_graphs and self._dev.type == "cuda":
                g, static, out = self._graph(len(batch))
                static.copy_(x)
                g.replay()
                return out.cpu().numpy().copy()
            return self._forward_u8(x).cpu().numpy()

    def predict(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(self._dev)
            x = x.to(self._dtype).contiguous(memory_format=self._fmt)
            return self._net(x).float().cpu().numpy()

    def compute_fn(self, batch: np.ndarray):
        """A zero-argument callable running the model on ``batch`` already on the device (for
        compute-only benchmarks); it waits for the device before returning."""
        import torch

        x = torch.from_numpy(np.ascontiguousarray(batch)).to(self._dev)
        sync = torch.cuda.synchronize if self._dev.type == "cuda" else (lambda: None)
        if self.options.cuda_graphs and self._dev.type == "cuda":
            g, static, _ = self._graph(len(batch))
            static.copy_(x)

            def run():
                g.replay()
                sync()
            return run

        def run():
            with torch.inference_mode():
                self._forward_u8(x)
            sync()
        return run

    def versions(self) -> dict[str, str]:
        import torch

        v = {"torch": torch.__version__}
        if self.device.startswith("cuda"):
            v["cuda"] = str(torch.version.cuda)
            v["cudnn"] = str(torch.backends.cudnn.version())
        return v

    def describe_device(self) -> str:
        import torch

        if self.device.startswith("cuda"):
            return torch.cuda.get_device_name(self._dev)
        n = torch.get_num_threads()
        return f"PyTorch CPU, {n} thread{'s' if n != 1 else ''}"

    def environment(self) -> dict:
        import torch

        if not self.device.startswith("cuda"):
            return {"threads": torch.get_num_threads()}
        props = torch.cuda.get_device_properties(self._dev)
        return {"accelerator": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                "compute_capability": f"{props.major}.{props.minor}", "cuda_runtime": str(torch.version.cuda),
                "driver": _nvidia_driver()}

    def peak_memory_bytes(self) -> int | None:
        import torch

        return torch.cuda.max_memory_allocated(self._dev) if self._dev.type == "cuda" else None

    def reset_peak_memory(self) -> None:
        import torch

        if self._dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self._dev)

    def close(self) -> None:
        self._net = None
        self._graphs = {}
        self._pinned = {}
        if getattr(self, "_dev", None) is not None and self._dev.type == "cuda":
            import torch

            torch.cuda.empty_cache()


def _bounded(cache: dict, keep: int = 4) -> None:
    """Make room in a per-batch-size cache (pinned buffers, CUDA graphs): a run uses its batch
    size and the last, shorter batch; a worker serving many runs must not grow without end."""
    while len(cache) >= keep:
        cache.pop(next(iter(cache)))


def _nvidia_driver() -> str | None:
    """The NVIDIA kernel driver's version, as the kernel module states it."""
    try:
        with open("/proc/driver/nvidia/version", encoding="utf-8") as f:
            words = f.readline().split()
    except OSError:
        return None
    return next((w for w in words if w[:1].isdigit() and "." in w), None)
