"""Cofe-Net degradation model for fundus photographs: batched, seeded, pure torch.

Re-implements the synthetic degradations of Cofe-Net (Shen et al., TMI 2020), as used by I-SECRET and
T-MAGE-Net to build (degraded, clean) training pairs. Three degradation types, always applied in the
order illumination → spot → blur:

- ``illumination``: colour jitter (brightness, contrast, saturation), then a blurred ring-shaped light
  leak ("halo"), then a blurred dark blob of uneven exposure ("hole").
- ``spot``: small bright blurred disks (dust and reflection artifacts).
- ``blur``: a small Gaussian blur; mode ``paper`` adds Gaussian noise after it.

Modes:

- ``cofe`` reproduces the released Cofe-Net code (its constants are the ground truth): 5–10 spots, no
  blur noise, and only the two coloured halo styles (the code's white halo is unreachable there,
  because it needs a brightness factor below 0.2 while the factor is drawn from [0.7, 1.2]).
- ``paper`` follows the T-MAGE-Net text: 10–30 spots, additive Gaussian noise with its sigma drawn from
  :data:`PAPER_NOISE_SIGMA` after the blur, and all three halo styles (white included).

Geometry: every constant is defined for a 512×512 working image. Sizes that the code already expresses
as fractions of the image (halo and hole centres, diameters and kernels, spot radii) scale naturally;
the spot amplitude and blur widths, which the code ties to absolute pixels, are computed on the
equivalent 512-pixel radius and scaled by ``min(H, W) / 512``. At 512² nothing is rescaled.

Randomness: every random number comes from the caller's CPU ``torch.Generator``, drawn before any pixel
is touched (:func:`sample_params`), so the result does not depend on the device the pixels live on
(up to float rounding). Images of a batch draw their parameters one after the other from the same
generator: ``degrade(batch, generator=g)`` equals degrading each image in turn with ``g`` (same
parameters; pixels equal up to float rounding). The noise of mode ``paper`` comes from its own
recorded ``noise_seed``, so a parameter dict replays exactly through :func:`apply_params`.

The returned parameter dicts are plain JSON (see :func:`sample_params` for the layout); values that
depend on the pixels (halo fill level, hole darkness) are filled in by :func:`apply_params`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Collection, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F

from model.filters import gaussian_blur, gaussian_kernel1d, stack_kernels

__all__ = [
    "ALL_TYPES",
    "HALO_STYLES",
    "MODES",
    "PAPER_NOISE_SIGMA",
    "REFERENCE_SIZE",
    "SUBSETS",
    "apply_params",
    "degrade",
    "degrade_image",
    "sample_params",
]

Mode = Literal["cofe", "paper"]

ALL_TYPES: tuple[str, ...] = ("illumination", "spot", "blur")
MODES: tuple[str, ...] = ("cofe", "paper")
#: Size the Cofe-Net constants were written for.
REFERENCE_SIZE = 512
#: The 7 non-empty type subsets, indexed like Cofe's codes: bit 0 illumination, bit 1 spot, bit 2 blur.
SUBSETS: tuple[tuple[str, ...], ...] = tuple(
    tuple(name for bit, name in enumerate(ALL_TYPES) if code >> bit & 1) for code in range(1, 8)
)
#: Halo colour weights (R, G, B) per style; style 0 is the white, wider halo.
HALO_STYLES: tuple[tuple[float, float, float], ...] = (
    (251 / 255, 249 / 255, 246 / 255),
    (141 / 255, 238 / 255, 238 / 255),
    (177 / 255, 195 / 255, 147 / 255),
)
#: Range of the additive noise sigma (on [0, 1] intensities) after the blur in mode ``paper``.
PAPER_NOISE_SIGMA = (0.01, 0.03)

_COFE_SPOTS = (5, 10)
_PAPER_SPOTS = (10, 30)
# ITU-R 601 luma, as PIL's "L" conversion used by the torchvision colour adjustments.
_LUMA = (0.299, 0.587, 0.114)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), dtype=torch.float64, generator=generator))


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in ``[low, high]``, inclusive like ``random.randint``; ``high < low`` gives ``low``."""
    high = max(high, low)
    return int(torch.randint(low, high + 1, (), generator=generator))


def _odd(n: int) -> int:
    return n if n % 2 else n + 1


def _scaled_odd(size_at_512: int, scale: float) -> int:
    return _odd(max(1, round(size_at_512 * scale)))


def _check_types(types: Collection[str] | None) -> tuple[str, ...] | None:
    if types is None:
        return None
    if isinstance(types, str):
        types = [t for t in types.split(",") if t]
    chosen = set(types)
    unknown = sorted(chosen - set(ALL_TYPES))
    if unknown:
        raise ValueError(f"unknown degradation type(s) {unknown}; expected a subset of {list(ALL_TYPES)}")
    if not chosen:
        raise ValueError(f"at least one degradation type is required, from {list(ALL_TYPES)}")
    return tuple(t for t in ALL_TYPES if t in chosen)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown degradation mode {mode!r}; expected one of {list(MODES)}")


def _check_generator(generator: torch.Generator) -> None:
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise ValueError("generator must be a CPU torch.Generator (draws are made on the CPU)")


def _sample_illumination(g: torch.Generator, h: int, w: int, mode: str) -> dict[str, Any]:
    short, long_side = min(h, w), max(h, w)
    brightness = _uniform(g, 0.7, 1.2)
    contrast = _uniform(g, 0.6, 1.4)
    saturation = _uniform(g, 0.6, 1.4)

    # Halo: a ring between two concentric disks, blurred. Cofe only reaches the white style 0 for a
    # brightness factor below 0.2, which its own range excludes; mode "paper" enables it.
    style = _randint(g, 0, 2) if mode == "paper" else _randint(g, 1, 2)
    cx = _randint(g, w // 2 - w // 8, w // 2 + w // 8)
    cy = _randint(g, h // 2 - h // 8, h // 2 + h // 8)
    inner = short * _uniform(g, 0.75, 1.0)
    far_x, far_y = max(cx, w - cx), max(cy, h - cy)
    outer_max = 2 * int(math.sqrt(far_x * far_x + far_y * far_y)) / short
    extra = long_side * (2 / 3 if style == 0 else 1 / 2)
    outer = short * _uniform(g, 1.0, outer_max) + abs(max(cx - w / 2, cy - h / 2) + extra)
    halo_extent = int(abs(2 * max(far_x, far_y) - inner))
    halo = {
        "style": style,
        "weights": list(HALO_STYLES[style]),
        "center": [cx, cy],
        "inner_diameter": inner,
        "outer_diameter": outer,
        "kernel": _odd(halo_extent),
        "sigma": 2 / 3 * halo_extent,
        "fill": None,
    }

    # Hole: a dark disk, blurred with a kernel about as wide as itself.
    diameter = _randint(g, int(0.4 * w), int(0.7 * w))
    hx = _randint(g, w // 4, 3 * w // 4)
    hy = _randint(g, 3 * h // 8, 5 * h // 8)
    base = _uniform(g, -0.262, -0.26)
    position = _uniform(g, 0.0, 1.0)
    kw = _randint(g, int(0.55 * diameter), int(0.75 * diameter))
    kh = _randint(g, int(0.55 * diameter), int(0.75 * diameter))
    hole = {
        "center": [hx, hy],
        "diameter": diameter,
        "kernel": [_odd(kw), _odd(kh)],
        "sigma": 0.8 * max(kw, kh),
        "base": base,
        "position": position,
        "fov_mean": None,
        "brightness": None,
    }
    return {
        "brightness": brightness,
        "contrast": contrast,
        "saturation": saturation,
        "halo": halo,
        "hole": hole,
    }


def _sample_spots(g: torch.Generator, h: int, w: int, mode: str) -> list[dict[str, Any]]:
    short = min(h, w)
    scale = short / REFERENCE_SIZE
    low, high = _PAPER_SPOTS if mode == "paper" else _COFE_SPOTS
    spots = []
    for _ in range(_randint(g, low, high)):
        radius = _randint(g, math.ceil(0.01 * short), int(0.05 * short))
        cx = _randint(g, radius + 1, w - radius - 1)
        cy = _randint(g, radius + 1, h - radius - 1)
        # Radius at 512 px; tiny images round their 1-px minimum up, so cap it at the 512 maximum.
        r512 = min(radius / scale, 0.05 * REFERENCE_SIZE)
        k = 14 / 25 + 1.0 - r512 / 25
        beta = 0.5 + r512 / 25
        amplitude = k * (1.0 - math.exp(-beta * 0.3 * r512 / 25))
        sigma512 = 2.0 * (5.0 + 20.0 * r512 / 25)
        kw = _randint(g, int(sigma512 / 5), int(sigma512 / 4))
        kh = _randint(g, int(sigma512 / 5), int(sigma512 / 4))
        spots.append(
            {
                "center": [cx, cy],
                "radius": radius,
                "disk_radius": radius // 2,
                "amplitude": amplitude,
                "kernel": [_scaled_odd(_odd(kw), scale), _scaled_odd(_odd(kh), scale)],
                "sigma": sigma512 * scale,
            }
        )
    return spots


def _sample_blur(g: torch.Generator, h: int, w: int, mode: str) -> dict[str, Any]:
    scale = min(h, w) / REFERENCE_SIZE
    sigma512 = _uniform(g, 5.0, 15.0)
    kw = _randint(g, int(sigma512 / 3), int(sigma512 / 2))
    kh = _randint(g, int(sigma512 / 3), int(sigma512 / 2))
    blur: dict[str, Any] = {
        "sigma": sigma512 * scale,
        "kernel": [_scaled_odd(_odd(kw), scale), _scaled_odd(_odd(kh), scale)],
        "noise_sigma": 0.0,
        "noise_seed": None,
    }
    if mode == "paper":
        blur["noise_sigma"] = _uniform(g, *PAPER_NOISE_SIGMA)
        blur["noise_seed"] = _randint(g, 0, 2**62)
    return blur


def sample_params(
    height: int,
    width: int,
    *,
    generator: torch.Generator,
    types: Collection[str] | None = None,
    mode: Mode = "cofe",
) -> dict[str, Any]:
    """Draw the parameters of one degradation (no pixels involved).

    Args:
        height: image height in pixels.
        width: image width in pixels.
        generator: CPU generator all draws come from.
        types: subset of :data:`ALL_TYPES` (or a comma-separated string); ``None`` draws one of the
            7 non-empty subsets uniformly, as I-SECRET's loader does.
        mode: ``"cofe"`` or ``"paper"`` (see the module docstring).

    Returns:
        A JSON-serialisable dict: ``mode``, ``types`` (canonical order), ``code`` (Cofe's three bits,
        blur/spot/illumination, e.g. ``"111"``), ``size`` ``[H, W]`` and one entry per chosen type:
        ``illumination`` (``brightness``, ``contrast``, ``saturation``, ``halo``, ``hole``), ``spots``
        (a list of disks) and ``blur``. Centres are ``[x, y]``, kernels ``[width, height]`` in pixels.
    """
    _check_generator(generator)
    _check_mode(mode)
    chosen = _check_types(types)
    if height < 8 or width < 8:
        raise ValueError(f"image too small to degrade: {height}x{width}")
    if chosen is None:
        chosen = SUBSETS[_randint(generator, 0, len(SUBSETS) - 1)]
    code = "".join("1" if name in chosen else "0" for name in reversed(ALL_TYPES))
    params: dict[str, Any] = {"mode": mode, "types": list(chosen), "code": code, "size": [height, width]}
    if "illumination" in chosen:
        params["illumination"] = _sample_illumination(generator, height, width, mode)
    if "spot" in chosen:
        params["spots"] = _sample_spots(generator, height, width, mode)
    if "blur" in chosen:
        params["blur"] = _sample_blur(generator, height, width, mode)
    return params


def _column(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """``[N, 1, 1, 1]`` tensor of per-image scalars on ``like``'s device and dtype."""
    return torch.tensor(list(values), dtype=like.dtype, device=like.device).view(-1, 1, 1, 1)


def _squared_distance(centers: Sequence[Sequence[int]], h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """``[N, 1, H, W]`` int32 squared distance of every pixel to integer centre ``(x, y)`` (exact)."""
    cx = torch.tensor([c[0] for c in centers], device=like.device, dtype=torch.int32).view(-1, 1, 1, 1)
    cy = torch.tensor([c[1] for c in centers], device=like.device, dtype=torch.int32).view(-1, 1, 1, 1)
    xs = torch.arange(w, device=like.device, dtype=torch.int32).view(1, 1, 1, w)
    ys = torch.arange(h, device=like.device, dtype=torch.int32).view(1, 1, h, 1)
    return (xs - cx) ** 2 + (ys - cy) ** 2


def _within(d2: torch.Tensor, radii: Sequence[int]) -> torch.Tensor:
    """``[N, 1, H, W]`` bool: ``d² <= r²`` per image, the disk test of the reference code on integers."""
    r = torch.tensor(list(radii), device=d2.device, dtype=torch.int32).view(-1, 1, 1, 1)
    return d2 <= r * r


def _luma(x: torch.Tensor) -> torch.Tensor:
    return _LUMA[0] * x[:, 0:1] + _LUMA[1] * x[:, 1:2] + _LUMA[2] * x[:, 2:3]


def _apply_illumination(x: torch.Tensor, fov: torch.Tensor, ps: list[dict[str, Any]]) -> torch.Tensor:
    """Colour jitter, halo and hole on ``x`` ``[N, 3, H, W]``; fills the pixel-dependent entries of ``ps``."""
    _, _, h, w = x.shape
    # Colour: torchvision's adjust_brightness/contrast/saturation (blend with black, with the mean grey
    # level of the whole image, and with the per-pixel grey), each clamped like the uint8 PIL path.
    # In place: a large photograph is one full-size tensor, not one per operation.
    x = x.clone()
    x.mul_(_column([p["brightness"] for p in ps], x)).clamp_(0, 1)
    contrast = _column([p["contrast"] for p in ps], x)
    grey_mean = _luma(x).mean(dim=(1, 2, 3), keepdim=True)
    x.mul_(contrast).add_((1 - contrast) * grey_mean).clamp_(0, 1)
    saturation = _column([p["saturation"] for p in ps], x)
    grey = _luma(x)
    x.mul_(saturation).add_(grey.mul_(1 - saturation)).clamp_(0, 1)
    del grey

    # Halo: ring (outer disk minus inner disk) filled with the image mean, blurred, tinted.
    halos = [p["halo"] for p in ps]
    fill = x.mean(dim=(1, 2, 3), keepdim=True)

    def halo_field(gh: int, gw: int, f: float) -> FieldSpec:
        d2 = _squared_distance([_scaled(q["center"], f) for q in halos], gh, gw, x)
        outer = _within(d2, [int(q["outer_diameter"] / 2 * f) for q in halos])
        inner = _within(d2, [int(q["inner_diameter"] / 2 * f) for q in halos])
        kernels = [_odd_scaled(q["kernel"], f) for q in halos]
        return (outer & ~inner).to(x.dtype) * fill, kernels, kernels, [q["sigma"] * f for q in halos]

    ring = _smooth_field(h, w, halo_field)
    tint = torch.tensor([q["weights"] for q in halos], dtype=x.dtype, device=x.device).view(-1, 3, 1, 1)
    x.addcmul_(tint, ring).clamp_(0, 1)
    del ring

    # Hole: a dark disk whose depth grows with the mean brightness inside the FOV, blurred. Images darker
    # than 0.25 on average get no hole (the draws are still consumed, so the sequence stays aligned).
    holes = [p["hole"] for p in ps]
    fov_mean = x.sum(dim=(1, 2, 3)) / (3 * fov.sum(dim=(1, 2, 3)).clamp_min(1.0))
    base = torch.tensor([q["base"] for q in holes], dtype=x.dtype, device=x.device)
    position = torch.tensor([q["position"] for q in holes], dtype=x.dtype, device=x.device)
    depth = torch.where(fov_mean > 0.25, base - 0.06 * fov_mean + 0.01 * fov_mean * position, 0.0)

    def hole_field(gh: int, gw: int, f: float) -> FieldSpec:
        d2 = _squared_distance([_scaled(q["center"], f) for q in holes], gh, gw, x)
        disk = _within(d2, [int(q["diameter"] // 2 * f) for q in holes])
        return (
            disk.to(x.dtype) * depth.view(-1, 1, 1, 1),
            [_odd_scaled(q["kernel"][0], f) for q in holes],
            [_odd_scaled(q["kernel"][1], f) for q in holes],
            [q["sigma"] * f for q in holes],
        )

    dark = _smooth_field(h, w, hole_field)
    x.add_(dark).clamp_(0, 1)
    del dark

    for halo, hole, f, m, d in zip(
        halos, holes, fill.flatten().tolist(), fov_mean.tolist(), depth.tolist(), strict=True
    ):
        halo["fill"], hole["fov_mean"], hole["brightness"] = f, m, d
    return x


#: Illumination fields (halo ring, hole) of images larger than this are drawn and blurred on a grid
#: of at most this size, then interpolated: they are smooth (blur kernels of a third of the image and
#: more), so a 4,000-pixel photograph is degraded in a fraction of the time and memory, and images of
#: up to this size (the 512² training and working images) are computed exactly as before.
FIELD_MAX_SIDE = 1024

FieldSpec = tuple[torch.Tensor, list[int], list[int], list[float]]


def _scaled(center: Sequence[int], factor: float) -> list[int]:
    return [round(c * factor) for c in center]


def _odd_scaled(size: int, factor: float) -> int:
    return _odd(max(1, round(size * factor))) if factor < 1.0 else int(size)


def _smooth_field(h: int, w: int, build: Callable[[int, int, float], FieldSpec]) -> torch.Tensor:
    """``[N, 1, H, W]`` blurred field from ``build(grid_h, grid_w, factor)`` → (field, kx, ky, sigmas).

    Up to :data:`FIELD_MAX_SIDE` the field is built at full size (factor 1); above, on a reduced grid
    with geometry and blur scaled by ``factor``, then interpolated bilinearly to ``H × W``.
    """
    factor = min(1.0, FIELD_MAX_SIDE / max(h, w))
    gh, gw = (h, w) if factor == 1.0 else (max(1, round(h * factor)), max(1, round(w * factor)))
    field, kx, ky, sigmas = build(gh, gw, factor)
    field = gaussian_blur(field, kx, ky, sigmas)
    if (gh, gw) != (h, w):
        field = F.interpolate(field, size=(h, w), mode="bilinear", align_corners=False)
    return field


def _spot_layer(spot_lists: list[list[dict[str, Any]]], h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """``[N, 1, H, W]`` sum of all blurred spot disks per image, rendered in small patches.

    Each spot only touches a patch of radius ``disk_radius + kernel radius`` around its centre, so the
    disks are built and blurred as a ``[S, P, P]`` stack (one grouped convolution) and scattered into the
    image with an accumulating ``index_put_``, instead of blurring a full-size layer per spot.
    """
    layer = torch.zeros(len(spot_lists), 1, h, w, dtype=like.dtype, device=like.device)
    flat = [(i, s) for i, spots in enumerate(spot_lists) for s in spots]
    if not flat:
        return layer
    kx = stack_kernels([gaussian_kernel1d(s["kernel"][0], s["sigma"]) for _, s in flat])
    ky = stack_kernels([gaussian_kernel1d(s["kernel"][1], s["sigma"]) for _, s in flat])
    half = max(s["disk_radius"] for _, s in flat) + max(kx.shape[1], ky.shape[1]) // 2
    offsets = torch.arange(-half, half + 1, device=like.device)
    d2 = (offsets.view(-1, 1) ** 2 + offsets.view(1, -1) ** 2).to(like.dtype)
    radius = torch.tensor([s["disk_radius"] for _, s in flat], dtype=like.dtype, device=like.device)
    disks = (d2.unsqueeze(0) <= (radius**2).view(-1, 1, 1)).to(like.dtype).unsqueeze(0)
    n = len(flat)
    kx = kx.to(device=like.device, dtype=like.dtype)
    ky = ky.to(device=like.device, dtype=like.dtype)
    patches = F.conv2d(disks, kx[:, None, None, :], padding=(0, kx.shape[1] // 2), groups=n)
    patches = F.conv2d(patches, ky[:, None, :, None], padding=(ky.shape[1] // 2, 0), groups=n)[0]
    patches = patches * torch.tensor(
        [s["amplitude"] for _, s in flat], dtype=like.dtype, device=like.device
    ).view(-1, 1, 1)
    image = torch.tensor([i for i, _ in flat], device=like.device).view(-1, 1, 1)
    ys = torch.tensor([s["center"][1] for _, s in flat], device=like.device).view(-1, 1, 1) + offsets.view(
        1, -1, 1
    )
    xs = torch.tensor([s["center"][0] for _, s in flat], device=like.device).view(-1, 1, 1) + offsets.view(
        1, 1, -1
    )
    ys, xs = torch.broadcast_tensors(ys, xs)
    inside = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    index = (image * (h * w) + ys * w + xs)[inside]
    layer.view(-1).index_put_((index,), patches[inside], accumulate=True)
    return layer


def _apply_blur(x: torch.Tensor, ps: list[dict[str, Any]]) -> torch.Tensor:
    x = gaussian_blur(
        x, [p["kernel"][0] for p in ps], [p["kernel"][1] for p in ps], [p["sigma"] for p in ps]
    ).clamp(0, 1)
    if any(p["noise_sigma"] > 0 for p in ps):
        noise = []
        for p in ps:
            g = torch.Generator().manual_seed(int(p["noise_seed"] or 0))
            noise.append(torch.randn(x.shape[1:], generator=g) * p["noise_sigma"])
        x = (x + torch.stack(noise).to(device=x.device, dtype=x.dtype)).clamp(0, 1)
    return x


def apply_params(
    images: torch.Tensor, fov: torch.Tensor | None, params: Sequence[dict[str, Any]]
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Degrade a batch with given parameters (from :func:`sample_params` or a saved JSON): a replay.

    Args:
        images: ``[B, 3, H, W]`` float in [0, 1], any device.
        fov: ``[B, 1, H, W]`` FOV mask in [0, 1] (soft edges allowed) or ``None`` (whole image).
        params: one parameter dict per image, sized ``[H, W]``.

    Returns:
        ``([B, 3, H, W]`` float32 degraded images multiplied by the FOV mask, completed deep copies of
        ``params`` with the pixel-dependent values filled in``)``.
    """
    if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(
            f"images must be a float [B, 3, H, W] tensor, got {tuple(images.shape)} {images.dtype}"
        )
    batch, _, h, w = images.shape
    if len(params) != batch:
        raise ValueError(f"{len(params)} parameter dicts for a batch of {batch}")
    x = images.to(torch.float32).clamp(0, 1)
    if fov is None:
        mask = torch.ones(batch, 1, h, w, dtype=x.dtype, device=x.device)
    else:
        if fov.shape != (batch, 1, h, w):
            raise ValueError(f"fov must be [B, 1, H, W] = {(batch, 1, h, w)}, got {tuple(fov.shape)}")
        mask = fov.to(device=x.device, dtype=x.dtype)
    filled = [copy.deepcopy(dict(p)) for p in params]
    for p in filled:
        _check_mode(p.get("mode", "cofe"))
        if list(p.get("size", [h, w])) != [h, w]:
            raise ValueError(f"parameters sampled for size {p['size']} applied to a {h}x{w} image")
        _check_types(p["types"])

    # Each step runs on the images that have it; a full batch skips the gather/scatter copies.
    steps = (
        (
            "illumination",
            lambda xs, rows, ps: _apply_illumination(xs, mask[rows], [p["illumination"] for p in ps]),
        ),
        ("spot", lambda xs, rows, ps: (xs + _spot_layer([p["spots"] for p in ps], h, w, xs)).clamp(0, 1)),
        ("blur", lambda xs, rows, ps: _apply_blur(xs, [p["blur"] for p in ps])),
    )
    for name, step in steps:
        index = [i for i, p in enumerate(filled) if name in p["types"]]
        if len(index) == batch:
            x = step(x, slice(None), filled)
        elif index:
            rows = torch.tensor(index, device=x.device)
            x = x.index_copy(0, rows, step(x[rows], rows, [filled[i] for i in index]))
    return x * mask, filled


def degrade(
    images: torch.Tensor,
    fov: torch.Tensor | None,
    *,
    generator: torch.Generator,
    types: Collection[str] | None = None,
    mode: Mode = "cofe",
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Degrade a batch of clean fundus images with freshly sampled Cofe-Net parameters.

    Args:
        images: ``[B, 3, H, W]`` float in [0, 1], any device (512² is the reference size).
        fov: ``[B, 1, H, W]`` FOV mask in [0, 1] or ``None``; the output is multiplied by it.
        generator: CPU ``torch.Generator``; images draw their parameters in batch order from it.
        types: subset of :data:`ALL_TYPES` applied to every image, or ``None`` for a uniformly drawn
            non-empty subset per image.
        mode: ``"cofe"`` (the released code) or ``"paper"`` (the T-MAGE-Net text).

    Returns:
        ``([B, 3, H, W]`` float32 degraded images, one JSON-serialisable parameter dict per image``)``.

    Raises:
        ValueError: unknown type or mode, an empty type set, a non-CPU generator, bad shapes.
    """
    _check_mode(mode)
    _check_types(types)
    if images.dim() != 4:
        raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
    h, w = images.shape[-2:]
    params = [
        sample_params(h, w, generator=generator, types=types, mode=mode) for _ in range(images.shape[0])
    ]
    return apply_params(images, fov, params)


def degrade_image(
    image: torch.Tensor,
    fov: torch.Tensor | None,
    seed: int,
    types: Collection[str] | None = None,
    mode: Mode = "cofe",
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Degrade one ``[3, H, W]`` image (FOV ``[1, H, W]`` or ``None``) with a generator seeded by ``seed``.

    Returns:
        ``([3, H, W]`` degraded image, its parameter dict with ``"seed"`` added``)``.
    """
    generator = torch.Generator().manual_seed(int(seed))
    out, params = degrade(
        image.unsqueeze(0),
        None if fov is None else fov.unsqueeze(0),
        generator=generator,
        types=types,
        mode=mode,
    )
    params[0]["seed"] = int(seed)
    return out[0], params[0]
