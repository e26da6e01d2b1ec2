"""The one feature extractor: image -> pixels -> (logits, pooled features of named layers).

Builder, service and evaluation all compute features through ``FeatureNetwork``: one forward
pass gives the logits and the globally average pooled activations of each requested layer.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torch import nn
from torch.utils.hooks import RemovableHandle

from app.core.errors import ConfigError, ModelLoadError
from app.core.images import jpeg_round_trip, to_rgb
from app.core.models import PreprocessingPreset
from app.core.stateful.hashes import eight_bit

# Arithmetic of the model's forward pass: "fp32", or autocast to bfloat16 / float16 (matmuls and
# convolutions in the lower precision, reductions in float32). Search never runs under it.
Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "bf16", "fp16")
_AUTOCAST_DTYPES: dict[Precision, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


@contextmanager
def ieee_float32_convolutions() -> Iterator[None]:
    """Float32 convolutions in IEEE float32 on CUDA as on the CPU.

    cuDNN runs float32 convolutions in TF32 (a 10-bit mantissa) unless told otherwise. On the
    H200 that moved one prediction and two accept/reject decisions in 2,000 CIFAR-10 test images
    against the CPU (bench/results/gpu/), and an early layer's Mahalanobis distance by half its
    spread for one image. Bundles are calibrated in float32, so "fp32" means IEEE float32; the
    faster arithmetic is the explicit bf16/fp16 choice. Only torch's new per-backend setting is
    touched (mixing it with the legacy ``allow_tf32`` flag makes torch raise).
    """
    convolutions = torch.backends.cudnn.conv  # type: ignore[attr-defined]  # set at import, untyped
    previous = convolutions.fp32_precision
    if previous == "ieee":
        yield
        return
    convolutions.fp32_precision = "ieee"
    try:
        yield
    finally:
        convolutions.fp32_precision = previous


def image_to_pixels(image: Image.Image, preset: PreprocessingPreset) -> torch.Tensor:
    """Decoded image -> float32 CxHxW tensor in [0, 1] (RGB, resized, centre cropped).

    Any mode (grayscale, palette, CMYK, alpha, 16-bit, float) is converted to RGB here
    (``images.to_rgb``), so callers hand over whatever Pillow decoded; a picture without an RGB
    reading (NaN values) raises ``ImageDecodeError``.
    """
    image = to_rgb(image)
    image = TF.resize(image, preset.resize, interpolation=TF.InterpolationMode.BILINEAR)
    image = TF.center_crop(image, [preset.crop, preset.crop])
    return eight_bit_to_pixels(np.asarray(image))


def eight_bit_to_pixels(image: npt.NDArray[np.uint8]) -> torch.Tensor:
    """HxWx3 uint8 -> 3xHxW float32 in [0, 1]: each value divided by 255 in float32, the values
    of torchvision's ``pil_to_tensor(image).float().div_(255)`` bit for bit (a function of the
    8-bit value alone; the tests compare all 256).

    One numpy call instead of that chain of torch calls: every call over a large array gives the
    interpreter lock back and takes it again, and in the service's decoding threads, beside an
    event loop that runs Python without pause, each retake waits for the switch interval.
    Measured by ``bench.decode_contention`` at 224x224 on two cores: 5.4 ms against 44 ms a
    conversion beside a busy thread, the same ~0.1 ms alone. It also never starts torch's
    intra-op threads, which on a busy machine make the small conversion wait for a descheduled
    thread."""
    pixels = np.empty((image.shape[2], image.shape[0], image.shape[1]), dtype=np.float32)
    np.divide(image.transpose(2, 0, 1), np.float32(255.0), out=pixels)
    return torch.from_numpy(pixels)


def global_average_pool(activation: torch.Tensor) -> torch.Tensor:
    """NxCxHxW -> NxC; NxTxC token sequences -> NxC (mean over tokens); NxC unchanged.

    The mean is taken in float32 whatever the activation's dtype (bf16/fp16 under autocast), so a
    lower-precision forward pass loses no further precision in the pooling."""
    activation = activation.float()
    if activation.dim() == 4:
        return activation.mean(dim=(2, 3))
    if activation.dim() == 3:
        return activation.mean(dim=1)
    if activation.dim() == 2:
        return activation
    raise ValueError(f"cannot pool an activation of shape {tuple(activation.shape)}")


# Pseudo-layers computed from the input pixels themselves, not from a module of the model.
PIXEL_HIGHPASS = "pixels.highpass"
# The same 9 energies in log space: log(max(energy, LOG_HIGHPASS_FLOOR)).
PIXEL_LOG_HIGHPASS = "pixels.loghighpass"
# The same three filters over the colour (chroma) channels of JPEG's YCbCr: 6 energies.
PIXEL_CHROMA_HIGHPASS = "pixels.chromahighpass"
PIXEL_LAYERS: tuple[str, ...] = (PIXEL_HIGHPASS, PIXEL_LOG_HIGHPASS, PIXEL_CHROMA_HIGHPASS)
# The classifier's logits on the horizontally mirrored input: a second forward pass, for
# ``margin@flip.logits`` (the flip margin, in the ``v2-flip`` preset). Not a pixel layer: it
# costs a whole forward pass, so only networks that read it compute it.
FLIPPED_LOGITS = "flip.logits"
# The classifier's logits on the image median-filtered over 2x2 pixels (``median_filter_2x2``),
# for ``margin@median.logits`` (the median margin, in the ``v2-median`` preset): another second
# pass, on every image.
MEDIAN_LOGITS = "median.logits"
# The classifier's logits on the image stored as a JPEG at ``JPEG_SQUEEZE_QUALITY`` and decoded
# (``jpeg_squeeze``), for ``margin@jpeg.logits`` (the JPEG margin, selection round 12): another
# second pass, on every image.
JPEG_LOGITS = "jpeg.logits"
SECOND_PASS_LAYERS: tuple[str, ...] = (FLIPPED_LOGITS, MEDIAN_LOGITS, JPEG_LOGITS)
PSEUDO_LAYERS: tuple[str, ...] = (*PIXEL_LAYERS, *SECOND_PASS_LAYERS)
# About a quarter of a grey level of mean energy: below it an image is flat for this statistic,
# and a flat image's log stays finite. Fixed with the selection rule (round 5), not tuned.
LOG_HIGHPASS_FLOOR = 1.0 / 1024


def median_filter_2x2(pixels: torch.Tensor) -> torch.Tensor:
    """NxCxHxW -> the same shape, each value the median of the 2x2 window of its channel that
    ends at it (rows i-1..i, columns j-1..j; the first row and column repeated at the border),
    the median of four being the upper middle value: ``scipy.ndimage.median_filter`` with
    ``size=2`` and ``mode="reflect"``, the squeezer Xu, Evans & Qi (NDSS 2018) chose for
    CIFAR-10.

    Why: a natural photo's class survives so small a smoothing (the CIFAR ResNets keep ~90% of
    held-out training photos' predictions), while a smooth L2 perturbation that pushed the
    prediction over a boundary is largely removed by it (pre-check 6, evaluation/README.md).
    Differentiable almost everywhere (a sort), so an adaptive attack can read through it."""
    padded = F.pad(pixels, (1, 0, 1, 0), mode="replicate")
    windows = padded.unfold(2, 2, 1).unfold(3, 2, 1)  # N x C x H x W x 2 x 2
    return windows.reshape(*pixels.shape, 4).sort(dim=-1).values[..., 2]


# Fixed with selection round 12's rule, not tuned: the stored-adversarial study's "JPEG 75" edit,
# and the quality the CIFAR-10 files were stored at (libjpeg's quantisation tables at 75).
JPEG_SQUEEZE_QUALITY = 75


def jpeg_squeeze(pixels: torch.Tensor, quality: int = JPEG_SQUEEZE_QUALITY) -> torch.Tensor:
    """NxCxHxW RGB pixels in [0, 1] -> the same shape: each image rounded to 8 bits as an upload
    is, stored as a JPEG at ``quality`` (``images.jpeg_round_trip``: Pillow's libjpeg, 4:2:0)
    and decoded, as ``image_to_pixels`` reads 8-bit values. On the host whatever the device
    (libjpeg), one image at a time.

    Why: the JPEG squeezer (Das et al. 2017). The fine perturbation that carries an adversarial
    over a decision boundary is largely quantised away, even after the attacker's own JPEG at a
    higher quality, while photos keep their class about as often as they had it right (the
    stored-adversarial and honest-edit studies, evaluation/README.md).

    Not differentiable: with a gradient wanted, the values are the round trip's and the gradient
    passes straight through (BPDA, Athalye et al. 2018), so an adaptive attack can read
    through it (the values then within float rounding of the round trip's)."""
    images = eight_bit(pixels.detach().float().cpu().numpy())
    decoded = [
        eight_bit_to_pixels(
            np.asarray(jpeg_round_trip(Image.fromarray(image.transpose(1, 2, 0)), quality))
        )
        for image in images
    ]
    squeezed = torch.stack(decoded).to(device=pixels.device, dtype=pixels.dtype)
    if not pixels.requires_grad:
        return squeezed
    return pixels + (squeezed - pixels).detach()


# Each second pass's image of the first pass's pixels.
_SECOND_PASS_IMAGES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    FLIPPED_LOGITS: lambda pixels: pixels.flip(-1),
    MEDIAN_LOGITS: median_filter_2x2,
    JPEG_LOGITS: jpeg_squeeze,
}


class PixelHighPass(nn.Module):
    """Pixels NxCxHxW in [0, 1] -> the absolute responses of three fixed high-pass filters per
    colour channel, Nx(3C)x(H-2)x(W-2) (valid convolution: no padding, so no border edges).

    The filters: the horizontal second difference [1, -2, 1], the vertical one (its transpose)
    and Immerkaer's noise kernel (their product, blind to edges along either axis). Pooled by
    the feature network's global average pool, they give the image's mean high-frequency energy
    per channel and direction: 9 numbers for RGB. Why: dense Linf attacks (FGSM and PGD at
    8/255, Square's column stripes) add high-frequency energy to every pixel, which the deep
    blocks' global average pools mostly average away; a natural photo's energy follows its
    class's texture, which the class-conditional Mahalanobis distance over these 9 numbers
    models.

    ``pixels.loghighpass`` holds the same numbers' logarithms (``log_energy``), a candidate of
    selection round 5 on the reasoning that raw energies are heavy-tailed across photos (a smooth
    photo's ~0.005, a textured one's ~0.1), so a tied Gaussian over them should miss noise on
    smooth photos. Measured, it lost: in log space the selection FGSM was accepted 12 times as
    often (``evaluation/results/selection-5/``). It stays so that ``--select`` reproduces round 5.
    """

    weight: torch.Tensor

    def __init__(self, channels: int = 3):
        super().__init__()
        second = torch.tensor([1.0, -2.0, 1.0])
        horizontal = torch.zeros(3, 3)
        horizontal[1] = second
        kernels = torch.stack([horizontal, horizontal.T, torch.outer(second, second)])
        self.channels = channels
        self.register_buffer("weight", kernels.repeat(channels, 1, 1).unsqueeze(1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.conv2d(pixels.float(), self.weight, groups=self.channels).abs()


# JPEG's full-range BT.601 colour channels (JFIF): Cb and Cr as rows over R, G, B in [0, 1],
# without the 0.5 offset, which no high-pass filter sees.
CHROMA_FROM_RGB = ((-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))


class ChromaHighPass(nn.Module):
    """Pixels NxCxHxW (RGB) in [0, 1] -> ``PixelHighPass``'s three filters over the image's Cb
    and Cr channels: Nx6x(H-2)x(W-2), pooled by the feature network into 6 energies
    (``pixels.chromahighpass``).

    Why: a 4:2:0 JPEG photo, which most cameras and this project's CIFAR-10 copy store, keeps
    its colour at half resolution, so its chroma channels carry little high-frequency energy,
    while a perturbation computed on the decoded pixels adds as much to them as to the
    brightness. In the default detector since selection round 6 (evaluation/README.md, "Detector
    v2"). What it reads is the capture pipeline: an honest upload that was never a 4:2:0 JPEG
    (a PNG screenshot, a camera photo shrunk to the model's size) is not what its class
    densities are fitted on.
    """

    weight: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("weight", torch.tensor(CHROMA_FROM_RGB).view(2, 3, 1, 1))
        self.highpass = PixelHighPass(channels=2)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        chroma = F.conv2d(pixels.float(), self.weight)
        result: torch.Tensor = self.highpass(chroma)
        return result


def log_energy(pooled: torch.Tensor) -> torch.Tensor:
    """Pooled high-pass energies -> ``pixels.loghighpass``: log(max(energy, floor))."""
    return torch.log(pooled.clamp_min(LOG_HIGHPASS_FLOOR))


@dataclass(frozen=True)
class ForwardOutput:
    logits: torch.Tensor
    features: dict[str, torch.Tensor]


class FeatureNetwork(nn.Module):
    """Normalisation + classifier with forward hooks on the requested layers.

    Takes pixels in [0, 1] so that attacks and the box constraint live in pixel space.
    Features of layer L are the global average pool of the output of the module named L; the
    pseudo-layers ``pixels.highpass``, ``pixels.loghighpass`` (``PixelHighPass``) and
    ``pixels.chromahighpass`` (``ChromaHighPass``) are computed from the pixels themselves,
    outside any autocast and in IEEE float32 on CUDA too, so they are the same arithmetic at
    every precision; ``flip.logits`` is the model's logits on the mirrored input and
    ``median.logits`` on the median-filtered one (second forward passes, at the first one's
    precision).
    ``set_execution`` picks the forward pass's arithmetic (fp32 or bf16/fp16 autocast) and
    memory format (channels_last); the default, fp32 and contiguous, is what bundles are built
    and calibrated with, so anything else must be checked to leave decisions unchanged.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, model: nn.Module, layers: Sequence[str], preset: PreprocessingPreset):
        super().__init__()
        if not layers:
            raise ValueError("at least one feature layer is needed")
        self.model = model
        self.layers = tuple(layers)
        self.register_buffer("mean", torch.tensor(preset.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(preset.std).view(1, 3, 1, 1))
        modules = dict(model.named_modules())
        missing = [n for n in self.layers if n not in modules and n not in PSEUDO_LAYERS]
        if missing:
            candidates = [name for name in modules if name and "." not in name]
            raise ModelLoadError(
                f"no layer named {missing} in the model; top-level: {candidates}"
                f" (or the pseudo-layers {list(PSEUDO_LAYERS)})"
            )
        self.pixel_layers = tuple(n for n in self.layers if n in PIXEL_LAYERS)
        wants_rgb = {PIXEL_HIGHPASS, PIXEL_LOG_HIGHPASS} & set(self.pixel_layers)
        self.highpass = PixelHighPass() if wants_rgb else None
        self.chroma = ChromaHighPass() if PIXEL_CHROMA_HIGHPASS in self.pixel_layers else None
        self.second_passes = tuple(n for n in self.layers if n in SECOND_PASS_LAYERS)
        # Mirror only the queries whose first-pass logit margin is below this (``doubt_margin``
        # statistics read no others; the rest of ``flip.logits`` is NaN); None: mirror all.
        self.mirror_below: float | None = None
        # Second passes ``forward`` leaves out, for the detector to run on the queries it
        # suspects (``second_pass``; ``Detector.deferred_layers``).
        self.deferred: tuple[str, ...] = ()
        self._captured: dict[str, torch.Tensor] = {}
        self._handles: list[RemovableHandle] = [
            modules[name].register_forward_hook(self._make_hook(name))
            for name in self.layers
            if name not in PSEUDO_LAYERS
        ]
        self.precision: Precision = "fp32"
        self.channels_last = False

    def set_execution(self, precision: Precision = "fp32", channels_last: bool = False) -> None:
        """Autocast precision and memory format of later forward passes (call after ``.to``)."""
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; use one of {PRECISIONS}")
        self.precision = precision
        self.channels_last = channels_last
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model.to(memory_format=memory_format)

    def _autocast(self) -> AbstractContextManager[object]:
        if self.precision == "fp32":
            return ieee_float32_convolutions()
        return torch.autocast(self.device.type, dtype=_AUTOCAST_DTYPES[self.precision])

    def _make_hook(self, name: str):  # type: ignore[no-untyped-def]
        def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            self._captured[name] = global_average_pool(output)

        return hook

    def forward(
        self,
        pixels: torch.Tensor,
        second_passes: bool | Collection[str] = True,
        second_pass_only: torch.Tensor | None = None,
    ) -> ForwardOutput:
        """The logits and every layer's pooled features; ``second_passes=False`` skips the
        mirrored and median-filtered passes (no ``flip.logits``, no ``median.logits``), for a
        caller that reads neither (an attack on statistics of the first pass); a collection of
        pseudo-layer names runs only those of the network's second passes (an attack on the
        median margin alone does not pay for the mirror).
        ``second_pass_only``, a boolean row mask, limits them to those rows (NaN elsewhere): the
        builder's held-out images, since nothing fitted on the indexed training images reads
        their logits."""
        self._captured = {}
        if self.highpass is not None:  # IEEE float32 whatever the precision (no TF32 on CUDA)
            with ieee_float32_convolutions():
                energy = global_average_pool(self.highpass(pixels))
            if PIXEL_HIGHPASS in self.pixel_layers:
                self._captured[PIXEL_HIGHPASS] = energy
            if PIXEL_LOG_HIGHPASS in self.pixel_layers:
                self._captured[PIXEL_LOG_HIGHPASS] = log_energy(energy)
        if self.chroma is not None:
            with ieee_float32_convolutions():
                self._captured[PIXEL_CHROMA_HIGHPASS] = global_average_pool(self.chroma(pixels))
        normalised = self._normalise(pixels)
        with self._autocast():
            logits = self.model(normalised)
        features, self._captured = self._captured, {}
        for name in self._second_passes_run(second_passes):
            features[name] = self._second_pass_logits(name, pixels, logits, second_pass_only)
            self._captured = {}  # the second pass's hook captures are not features
        return ForwardOutput(logits=logits, features=features)

    def _second_passes_run(self, wanted: bool | Collection[str]) -> tuple[str, ...]:
        """The network's second passes that ``forward``'s ``second_passes`` asks for: all but
        the deferred ones (True), none, or those named."""
        if isinstance(wanted, bool):  # a deferred pass runs when a caller names it
            return tuple(n for n in self.second_passes if n not in self.deferred) if wanted else ()
        return tuple(name for name in self.second_passes if name in wanted)

    def second_pass(
        self, layer: str, pixels: torch.Tensor, rows: torch.Tensor, classes: int
    ) -> torch.Tensor:
        """A second pass's logits (``SECOND_PASS_LAYERS``; ``classes`` of them) for the rows of
        ``pixels`` that ``rows`` (bool) marks, NaN elsewhere: a deferred layer, run once the
        detector knows which queries it reads."""
        with torch.inference_mode():
            chosen = torch.nonzero(rows.to(pixels.device, torch.bool)).squeeze(1)
            out = torch.full((pixels.shape[0], classes), torch.nan, device=pixels.device)
            if chosen.numel():
                out[chosen] = self._second_pass_of(layer, pixels[chosen]).float()
            return out

    def _second_pass_logits(
        self,
        layer: str,
        pixels: torch.Tensor,
        logits: torch.Tensor,
        only: torch.Tensor | None,
    ) -> torch.Tensor:
        """The logits of the mirrored (``flip.logits``), median-filtered (``median.logits``) or
        JPEG-squeezed (``jpeg.logits``) images: of every one, or for the mirror
        (``mirror_below``) of those the first pass doubts, within ``only`` where given, NaN
        elsewhere; a batch without such a row costs no second pass."""
        wanted = None if only is None else only.to(logits.device, torch.bool)
        if self.mirror_below is not None and layer == FLIPPED_LOGITS:
            top_two = logits.detach().float().topk(2, dim=1).values
            doubted = top_two[:, 0] - top_two[:, 1] < self.mirror_below
            wanted = doubted if wanted is None else wanted & doubted
        rows = None if wanted is None or bool(wanted.all()) else torch.nonzero(wanted).squeeze(1)
        chosen = pixels if rows is None else pixels[rows]
        if chosen.shape[0] == 0:
            return torch.full(logits.shape, torch.nan, dtype=torch.float32, device=logits.device)
        second = self._second_pass_of(layer, chosen)
        if rows is None:
            return second
        out = torch.full(
            (logits.shape[0], second.shape[1]), torch.nan, dtype=second.dtype, device=second.device
        )
        out[rows] = second
        return out

    def _second_pass_of(self, layer: str, pixels: torch.Tensor) -> torch.Tensor:
        """The logits of ``pixels`` transformed as ``layer``'s pass transforms them."""
        transformed = _SECOND_PASS_IMAGES[layer](pixels)
        with self._autocast():
            logits: torch.Tensor = global_average_pool(self.model(self._normalise(transformed)))
        return logits

    def _normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        normalised = (pixels - self.mean) / self.std
        if self.channels_last:
            normalised = normalised.contiguous(memory_format=torch.channels_last)
        return normalised

    def classify(self, pixels: torch.Tensor) -> torch.Tensor:
        """The logits of the first forward pass alone: no pixel statistics and no second pass,
        which an attack on the classifier neither needs nor should pay for."""
        with self._autocast():
            logits: torch.Tensor = self.model(self._normalise(pixels))
        self._captured = {}
        return logits

    @property
    def device(self) -> torch.device:
        return self.mean.device


@dataclass(frozen=True)
class BatchFeatures:
    """Numpy view of one inference batch: what the detector consumes."""

    probabilities: np.ndarray  # (n, classes) float32
    predictions: np.ndarray  # (n,) int64
    features: dict[str, np.ndarray]  # layer -> (n, d) float32
    # the batch's pixels on the model's device, for a deferred second pass (``infer_batch``)
    pixels: torch.Tensor | None = None


def pick_device(requested: str | None = None) -> torch.device:
    """``cuda`` when available unless told otherwise. A device that is not a torch device, or a
    CUDA device on a machine without one, is refused here in one line (torch would fail later,
    at the first tensor moved, with a driver traceback)."""
    if not requested:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise ConfigError(
            f"device {requested!r} is not a torch device (cpu, cuda, cuda:N)"
        ) from exc
    if device.type == "cuda":
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if available == 0 or (device.index or 0) >= available:
            raise ConfigError(f"device {requested!r}: this machine has {available} CUDA devices")
    return device


def infer_batch(
    network: FeatureNetwork, pixels: torch.Tensor, second_pass_only: torch.Tensor | None = None
) -> BatchFeatures:
    """One inference-mode forward pass of a pixel batch -> probabilities, predictions, features
    (``second_pass_only``: ``FeatureNetwork.forward``'s)."""
    with torch.inference_mode():
        device_pixels = pixels.to(network.device, non_blocking=True)
        out = network(device_pixels, second_pass_only=second_pass_only)
        probabilities = torch.softmax(out.logits.float(), dim=1)
        return BatchFeatures(
            probabilities=probabilities.cpu().numpy(),
            predictions=probabilities.argmax(dim=1).cpu().numpy().astype(np.int64),
            features={k: v.float().cpu().numpy() for k, v in out.features.items()},
            pixels=device_pixels if network.deferred else None,
        )


def infer_in_batches(
    network: FeatureNetwork, pixels: torch.Tensor, batch_size: int = 500
) -> BatchFeatures:
    """``infer_batch`` over a set of any size, ``batch_size`` images a pass (the evaluation's
    sets and the benchmarks' splits: one pass over thousands of images would hold every layer's
    activations at once), concatenated in order."""
    parts = [
        infer_batch(network, pixels[i : i + batch_size])
        for i in range(0, pixels.shape[0], batch_size)
    ]
    return BatchFeatures(
        probabilities=np.concatenate([p.probabilities for p in parts]),
        predictions=np.concatenate([p.predictions for p in parts]),
        features={
            layer: np.concatenate([p.features[layer] for p in parts]) for layer in network.layers
        },
    )
