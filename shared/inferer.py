"""The sliding-window predictor used by the API, the evaluation and the report: MONAI's window grid,
run as fast as the machine allows, and the arithmetic to say how close to the machine's limit it is.

What it does on top of ``monai.inferers.sliding_window_inference`` (same window positions, same
gaussian blending, replicate padding so no zero enters before the first instance norm):

* ``torch.inference_mode`` instead of ``no_grad`` (no version counters, no autograd state);
* ``precision="bf16"``: the network body under CPU/CUDA bf16 autocast, the **first convolution
  in float32** (a raw scanner intensity of several hundred keeps 3 significant digits in bf16,
  which would break the invariance to ``s*x+b``; after the first normalisation every activation
  is O(1)); ``"auto"`` picks bf16 where the processor has native bf16 (AVX512-BF16/AMX, or a
  CUDA device that supports it), else float32;
* ``channels_last=True``: weights and windows in ``channels_last_3d`` (oneDNN's blocked layout);
* ``sw_batch_size=None`` (the default): as many windows per forward pass as fit the backend's
  ``WINDOW_PASS_VOXELS``, spread evenly over the passes. Instance norm is per window, so batching
  changes no label, only speed, and the backends disagree: torch runs fastest on small passes
  (2 x 64^3 voxels: the demo model's twelve 64^3 windows in passes of 2 took 0.099 s against 0.158 s in
  one pass of 12, the large model's 27 windows of 96^3 one per pass 1.40 s against 2.00 s at 4 per pass;
  2 threads, 2026-11-25, medians of 5 and 3 interleaved runs), OpenVINO and ONNX Runtime on large ones
  (demo: 0.099 s in one pass of 12 against 0.117 s in passes of 2), and so does torch on a GPU (not
  measured: no GPU here);
* ``window``: windows larger than the training crop (instance norm is per window, so a window is
  never smaller than the crop the network was trained on); fewer windows, less overlap work;
* ``backend="openvino"`` (optional: ``pip install .[openvino]``): the windows run through the network
  converted and compiled by OpenVINO's CPU plugin, float32 forced (its default on bf16-capable CPUs
  would be bf16), one compiled model per window-batch shape, each window centred first (see
  ``_centred``: OpenVINO alone broke the invariance to ``s*x+b``); labels equal to torch's on
  >= 99.9 % of voxels (other kernels, other summation order);
* ``backend="onnxruntime"`` (optional: ``pip install .[onnxruntime]``): the same, through an ONNX
  export of the network (torch's TorchScript exporter) run by ONNX Runtime's CPU provider with every
  graph optimisation; one session per window-batch shape, windows centred as for OpenVINO.

The float32 path with the default window is MONAI's own result (same code path, to the bit
except for inference mode); the others are measured against it in ``bench/bench_inference.py``
and ``tests/shared/test_inferer.py`` (label agreement, stated tolerance: >= 99.9 % of voxels).

:func:`window_plan` and :func:`network_flops` give the work actually done (windows, voxels run
through the network, the overlap's share, FLOPs) so a benchmark can divide by a dense
convolution's throughput: the compute floor.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import torch

__all__ = [
    "BACKENDS",
    "PRECISIONS",
    "InferenceOptions",
    "onnxruntime_available",
    "openvino_available",
    "SlidingWindowPredictor",
    "WindowPlan",
    "bf16_supported",
    "covering_window",
    "network_flops",
    "resolve_device",
    "window_plan",
    "windows_per_pass",
]

PRECISIONS = ("fp32", "bf16", "auto")
BACKENDS = ("torch", "openvino", "onnxruntime")
EXPORTED_BACKENDS = ("openvino", "onnxruntime")  # float32 runtimes fed a converted network
# Voxels of windows run through the network in one forward pass when ``sw_batch_size`` is None, per
# backend (measured: see the module's docstring; torch's activations stay in cache on small passes).
# "cuda": torch on a GPU, which wants large passes (not measured here, no GPU on this machine kind: the old
# default, about what a MONAI bundle's sw_batch_size of 4 windows of 96^3 runs).
WINDOW_PASS_VOXELS = {"torch": 2 * 64**3, "cuda": 16 * 64**3, "openvino": 16 * 64**3, "onnxruntime": 16 * 64**3}


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or ``None``): CUDA when available, else CPU; otherwise ``torch.device(name)``.

    An explicit ``"cuda"`` without a usable GPU raises ``ValueError`` instead of failing later.
    """
    if isinstance(name, torch.device):
        return name
    value = (name or "auto").strip().lower()
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(value)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but no CUDA device is available (use 'auto' or 'cpu')")
    return device


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def openvino_available() -> bool:
    """Whether the optional OpenVINO runtime is installed."""
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def onnxruntime_available() -> bool:
    """Whether the optional ONNX Runtime (and ``onnx``, which torch's exporter needs) is installed."""
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx"))


def bf16_supported(device: torch.device | str = "cpu") -> bool:
    """Native bf16 arithmetic on ``device``: AVX512-BF16 or AMX on a CPU, ``is_bf16_supported`` on CUDA."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


@dataclass(frozen=True)
class InferenceOptions:
    """How the sliding window runs.

    Args:
        overlap: window overlap (MONAI's ``overlap``).
        sw_batch_size: windows per forward pass; ``None``: :func:`windows_per_pass`.
        mode: blending, ``"gaussian"`` (training's evaluation) or ``"constant"``.
        precision: ``"fp32"``, ``"bf16"`` (body in bf16, first convolution in float32) or ``"auto"``.
        channels_last: run the network in ``channels_last_3d``.
        window: window size; ``None`` is the training crop. Each side is at least the crop's.
        backend: ``"torch"``, ``"openvino"`` or ``"onnxruntime"`` (the last two: CPU, float32 only; each
            needs its package).
    """

    overlap: float = 0.25
    sw_batch_size: int | None = None
    mode: str = "gaussian"
    precision: str = "fp32"
    channels_last: bool = False
    window: tuple[int, int, int] | None = None
    backend: str = "torch"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.backend in EXPORTED_BACKENDS and (self.precision != "fp32" or self.channels_last):
            raise ValueError(
                f"the {self.backend} backend runs float32 in its own layout: precision fp32, no channels_last"
            )
        if not 0 <= self.overlap < 1:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")
        if self.sw_batch_size is not None and self.sw_batch_size < 1:
            raise ValueError(f"sw_batch_size must be >= 1, got {self.sw_batch_size}")
        if self.mode not in ("gaussian", "constant"):
            raise ValueError(f"mode must be 'gaussian' or 'constant', got {self.mode!r}")
        if self.window is not None:
            object.__setattr__(self, "window", tuple(int(v) for v in self.window))


@dataclass
class WindowPlan:
    """The work a sliding-window pass does over one volume."""

    image_shape: tuple[int, ...]
    window: tuple[int, ...]
    windows: int
    voxels_processed: int  # windows x window voxels: what the network runs over
    voxels_covered: int  # the (padded) volume's voxels: what it would run over with no overlap
    overlap_share: float = field(init=False)

    def __post_init__(self) -> None:
        self.overlap_share = 1.0 - self.voxels_covered / self.voxels_processed if self.voxels_processed else 0.0

    def to_dict(self) -> dict:
        return {
            "image_shape": list(self.image_shape),
            "window": list(self.window),
            "windows": self.windows,
            "voxels_processed": self.voxels_processed,
            "voxels_covered": self.voxels_covered,
            "overlap_share": round(self.overlap_share, 4),
        }


def window_plan(image_shape, window, overlap: float = 0.25) -> WindowPlan:
    """MONAI's window grid for ``image_shape`` (spatial): count, voxels processed, overlap's share."""
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    shape = tuple(int(s) for s in image_shape)
    win = tuple(int(w) for w in window)
    padded = tuple(max(s, w) for s, w in zip(shape, win))  # MONAI pads up to the window first
    interval = _get_scan_interval(padded, win, len(win), (float(overlap),) * len(win))
    n = len(dense_patch_slices(padded, win, interval))
    return WindowPlan(shape, win, n, n * math.prod(win), math.prod(padded))


def windows_per_pass(n_windows: int, window, backend: str = "torch") -> int:
    """Windows per forward pass: at most ``WINDOW_PASS_VOXELS[backend]`` voxels (at least one window;
    ``backend``: a key of that table),
    the ``n_windows`` spread evenly over the passes (torch: 12 windows of 64^3 in passes of 2, 27 of 96^3
    one at a time; OpenVINO: 12 of 64^3 in one pass, 27 of 96^3 in seven passes of 4 (at most), 17 of
    64^3 in two passes of 9, not 16 + 1)."""
    most = max(1, WINDOW_PASS_VOXELS[backend] // math.prod(int(w) for w in window))
    n = max(1, int(n_windows))
    passes = math.ceil(n / most)
    return math.ceil(n / passes)


def covering_window(image_shape, roi_size, multiple: int = 8) -> tuple[int, ...]:
    """The smallest window that covers ``image_shape`` in one piece: each side at least the training
    crop and a multiple of ``multiple`` (the UNet's total downsampling, so no padding inside)."""
    return tuple(
        max(int(r), int(math.ceil(int(s) / multiple) * multiple)) for s, r in zip(image_shape, roi_size)
    )


_FLOPS_CACHE: dict[tuple, int] = {}


def network_flops(network: torch.nn.Module, window, in_channels: int | None = None) -> int:
    """FLOPs (multiply and add counted separately) of one forward of one ``window``, counted by
    ``torch.utils.flop_counter`` on the float32 network (cached per network and window)."""
    from torch.utils.flop_counter import FlopCounterMode

    win = tuple(int(w) for w in window)
    key = (id(network), win)
    if key not in _FLOPS_CACHE:
        param = next(network.parameters())
        channels = in_channels or _in_channels(network)
        x = torch.zeros((1, channels, *win), dtype=torch.float32, device=param.device)
        was_training = network.training
        network.eval()
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            network(x)
        network.train(was_training)
        _FLOPS_CACHE[key] = int(counter.get_total_flops())
    return _FLOPS_CACHE[key]


def _in_channels(network: torch.nn.Module) -> int:
    first = _first_conv(network)
    return first.in_channels if first is not None else 1


def _first_conv(network: torch.nn.Module):
    for module in network.modules():
        if isinstance(module, (torch.nn.Conv3d, torch.nn.Conv2d, torch.nn.Conv1d)):
            return module
    return None


class _Float32First:
    """Forward hooks that run one module outside autocast (float32 in, float32 out)."""

    def __init__(self, module: torch.nn.Module, device_type: str) -> None:
        self.device_type = device_type
        self.saved: list[bool] = []
        self.handles = [
            module.register_forward_pre_hook(self._pre),
            module.register_forward_hook(self._post),
        ]

    def _pre(self, module, args):
        self.saved.append(torch.is_autocast_enabled(self.device_type))
        torch.set_autocast_enabled(self.device_type, False)
        return tuple(a.float() if torch.is_tensor(a) else a for a in args)

    def _post(self, module, args, output):
        torch.set_autocast_enabled(self.device_type, self.saved.pop())
        return output

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _centred(window: torch.Tensor) -> torch.Tensor:
    """Each window and channel minus its mean (float64), as float32 on the CPU.

    The network is invariant to ``x + c`` per window (replicate padding, instance norm after the
    first convolution), so this changes no result in exact arithmetic. OpenVINO's kernels lost that
    invariance on raw scanner intensities (label agreement 0.98 at s=0.25, b=-500 on a test net;
    torch float32: 1.0000): a large offset costs digits before the first normalisation removes it.
    The scale is left alone (dividing by a background window's ~0 spread would amplify rounding).
    """
    x = window.detach().to("cpu", torch.float64)
    return (x - x.mean(dim=tuple(range(2, x.ndim)), keepdim=True)).to(torch.float32)


class SlidingWindowPredictor:
    """Sliding-window logits of one network with fixed options; reuse it for many volumes.

    The network is put in eval mode and, for ``channels_last``, converted in place (its values are
    unchanged; only the memory layout of the weights changes).

    Examples::

        predictor = SlidingWindowPredictor(net, roi_size=(64, 64, 64), options=InferenceOptions(precision="auto"))
        logits = predictor.logits(image)  # image (C, X, Y, Z) or (B, C, X, Y, Z) -> (B, classes, X, Y, Z) float32
    """

    def __init__(
        self,
        network: torch.nn.Module,
        roi_size,
        options: InferenceOptions | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.network = network
        self.options = options or InferenceOptions()
        self.roi_size = tuple(int(v) for v in roi_size)
        window = self.options.window or self.roi_size
        if len(window) != len(self.roi_size) or any(w < r for w, r in zip(window, self.roi_size)):
            raise ValueError(f"window {window} must be at least the training crop {self.roi_size} on every side")
        self.window = tuple(window)
        param = next(network.parameters())
        self.device = torch.device(device) if device is not None else param.device
        if param.device != self.device:
            network.to(self.device)
        precision = self.options.precision
        if precision == "auto":
            precision = "bf16" if bf16_supported(self.device) else "fp32"
        self.precision = precision
        if self.options.channels_last:
            network.to(memory_format=torch.channels_last_3d)
        network.eval()
        # Exported backends: window-batch shape -> a function of a numpy window batch returning logits
        self._compiled: dict[tuple[int, ...], object] = {}
        self._lock = threading.Lock()  # an infer request serves one call at a time (the API may share a predictor)
        backend = self.options.backend
        if backend in EXPORTED_BACKENDS:
            if self.device.type != "cpu":
                raise ValueError(f"the {backend} backend runs on the CPU")
            if not (openvino_available() if backend == "openvino" else onnxruntime_available()):
                raise ValueError(f"backend {backend!r} needs its package (pip install '.[{backend}]')")

    def _compile(self, shape: tuple[int, ...]):
        threads = torch.get_num_threads()
        with torch.inference_mode(False), torch.no_grad():  # converters trace; they cannot take inference tensors
            example = torch.zeros(shape)
            if self.options.backend == "openvino":
                import openvino as ov

                model = ov.convert_model(self.network, example_input=example)
                config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads}
                request = ov.Core().compile_model(model, "CPU", config).create_infer_request()
                return lambda x: next(iter(request.infer({0: x}).values()))
            import io
            import warnings

            import onnxruntime as ort

            buffer = io.BytesIO()
            with warnings.catch_warnings():  # the exporter's notes on instance norm's training flag
                warnings.simplefilter("ignore")
                torch.onnx.export(self.network, (example,), buffer, dynamo=False, input_names=["window"])
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = threads
        session_options.inter_op_num_threads = 1
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(buffer.getvalue(), session_options, providers=["CPUExecutionProvider"])
        return lambda x: session.run(None, {"window": x})[0]

    def _exported(self, window: torch.Tensor) -> torch.Tensor:
        shape = tuple(window.shape)
        with self._lock:
            if shape not in self._compiled:
                self._compiled[shape] = self._compile(shape)
            out = self._compiled[shape](_centred(window).numpy())
            return torch.from_numpy(out.copy())

    def _predictor(self, window: torch.Tensor) -> torch.Tensor:
        if self.options.backend in EXPORTED_BACKENDS:
            return self._exported(window)
        if self.options.channels_last:
            window = window.contiguous(memory_format=torch.channels_last_3d)
        if self.precision != "bf16":
            return self.network(window)
        first = _first_conv(self.network)
        hooks = _Float32First(first, self.device.type) if first is not None else None
        try:
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                out = self.network(window)
        finally:
            if hooks is not None:
                hooks.remove()
        return out.float()

    def plan(self, spatial_shape) -> WindowPlan:
        return window_plan(spatial_shape, self.window, self.options.overlap)

    def flops(self, spatial_shape) -> int:
        """FLOPs of the network over every window of a volume of ``spatial_shape``."""
        return self.plan(spatial_shape).windows * network_flops(self.network, self.window)

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``(B, classes, X, Y, Z)`` on the network's device for a ``(C, X, Y, Z)`` or
        ``(B, C, X, Y, Z)`` image."""
        from monai.inferers import sliding_window_inference

        x = image if image.ndim == 5 else image.unsqueeze(0)
        x = torch.as_tensor(x).to(device=self.device, dtype=torch.float32)
        budget = "cuda" if self.device.type == "cuda" else self.options.backend
        batch = self.options.sw_batch_size or windows_per_pass(self.plan(x.shape[2:]).windows, self.window, budget)
        with torch.inference_mode():
            out = sliding_window_inference(
                x,
                roi_size=self.window,
                sw_batch_size=batch,
                predictor=self._predictor,
                overlap=self.options.overlap,
                mode=self.options.mode,
                padding_mode="replicate",
            )
        out = out.as_tensor() if hasattr(out, "as_tensor") else out  # MetaTensor in, plain tensor out
        return out.float()

    def probabilities(self, image: torch.Tensor) -> torch.Tensor:
        """Softmax ``(classes, X, Y, Z)`` on the CPU for a single image."""
        return torch.softmax(self.logits(image), dim=1)[0].cpu()

    def labels(self, image: torch.Tensor) -> torch.Tensor:
        """``uint8`` label map ``(X, Y, Z)`` on the CPU for a single image."""
        from shared.resample import class_argmax

        return class_argmax(self.logits(image)[0]).cpu()
