"""Cofe-Net degradation model: determinism, parameter ranges, subsets, FOV masking, batching, accuracy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch

from model.degradation import (
    ALL_TYPES,
    PAPER_NOISE_SIGMA,
    SUBSETS,
    apply_params,
    degrade,
    degrade_image,
    sample_params,
)
from model.filters import fft_separable_blur, gaussian_blur, gaussian_kernel1d, separable_blur, stack_kernels


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def fundus(data_root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """A real 512² fundus photograph ``[3, H, W]`` in [0, 1] and a hard FOV mask ``[1, H, W]``."""
    bgr = cv2.imread(str(data_root / "deepdrid" / "images" / "100_l2.jpg"), cv2.IMREAD_COLOR)
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    mask = (rgb.max(axis=2) > 20).astype(np.float32)
    image = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255 * torch.from_numpy(mask)
    return image, torch.from_numpy(mask)[None]


def _synthetic(batch: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disk = (((yy - size / 2) ** 2 + (xx - size / 2) ** 2) <= (0.45 * size) ** 2).float()
    base = torch.tensor([0.7, 0.35, 0.15]).view(1, 3, 1, 1)
    images = (base + 0.1 * torch.rand(batch, 3, size, size, generator=g)).clamp(0, 1) * disk
    return images, disk.expand(batch, 1, size, size).clone()


def test_degrade_same_seed_is_identical_and_different_seed_differs() -> None:
    images, fov = _synthetic(2, 128)
    a, pa = degrade(images, fov, generator=_gen(7))
    b, pb = degrade(images, fov, generator=_gen(7))
    c, pc = degrade(images, fov, generator=_gen(8))
    assert torch.equal(a, b)
    assert pa == pb
    assert pa != pc
    assert not torch.equal(a, c)


def test_degrade_image_records_seed_and_is_reproducible(fundus: tuple[torch.Tensor, torch.Tensor]) -> None:
    image, fov = fundus
    out1, p1 = degrade_image(image, fov, seed=3)
    out2, p2 = degrade_image(image, fov, seed=3)
    assert torch.equal(out1, out2)
    assert p1 == p2 and p1["seed"] == 3
    assert out1.shape == image.shape and out1.dtype == torch.float32
    json.dumps(p1)  # plain JSON


def test_cofe_parameter_ranges() -> None:
    g = _gen(0)
    samples = [sample_params(512, 512, generator=g, types=ALL_TYPES, mode="cofe") for _ in range(400)]
    counts = {len(p["spots"]) for p in samples}
    assert counts == set(range(5, 11))
    radii = {s["radius"] for p in samples for s in p["spots"]}
    assert min(radii) == 6 and max(radii) == 25
    for p in samples:
        il = p["illumination"]
        assert 0.7 <= il["brightness"] <= 1.2
        assert 0.6 <= il["contrast"] <= 1.4
        assert 0.6 <= il["saturation"] <= 1.4
        assert il["halo"]["style"] in (1, 2)
        assert 204 <= il["hole"]["diameter"] <= 358
        assert 5 <= p["blur"]["sigma"] <= 15
        assert p["blur"]["noise_sigma"] == 0.0 and p["blur"]["noise_seed"] is None
        for spot in p["spots"]:
            assert spot["amplitude"] > 0
            assert spot["disk_radius"] == spot["radius"] // 2
    kernels = {k for p in samples for k in p["blur"]["kernel"]}
    assert kernels == {1, 3, 5, 7}


def test_paper_parameter_ranges_and_noise(fundus: tuple[torch.Tensor, torch.Tensor]) -> None:
    g = _gen(1)
    samples = [sample_params(512, 512, generator=g, types=ALL_TYPES, mode="paper") for _ in range(300)]
    counts = {len(p["spots"]) for p in samples}
    assert min(counts) == 10 and max(counts) == 30
    assert {p["illumination"]["halo"]["style"] for p in samples} == {0, 1, 2}
    low, high = PAPER_NOISE_SIGMA
    assert all(low <= p["blur"]["noise_sigma"] <= high for p in samples)

    image, fov = fundus
    params = sample_params(512, 512, generator=_gen(2), types=["blur"], mode="paper")
    noisy, _ = apply_params(image[None], fov[None], [params])
    silent = json.loads(json.dumps(params))
    silent["blur"]["noise_sigma"] = 0.0
    clean, _ = apply_params(image[None], fov[None], [silent])
    inside = (fov[0] > 0) & (clean[0, 1] > 0.1) & (clean[0, 1] < 0.9)
    residual = (noisy - clean)[0, :, inside]
    assert residual.std().item() == pytest.approx(params["blur"]["noise_sigma"], rel=0.1)


@pytest.mark.parametrize("subset", SUBSETS, ids=["+".join(s) for s in SUBSETS])
def test_every_subset_runs(subset: tuple[str, ...], fundus: tuple[torch.Tensor, torch.Tensor]) -> None:
    image, fov = fundus
    out, params = degrade(image[None], fov[None], generator=_gen(5), types=subset)
    assert out.shape == (1, 3, 512, 512)
    assert out.min().item() >= 0.0 and out.max().item() <= 1.0
    assert params[0]["types"] == list(subset)
    assert ("illumination" in params[0]) == ("illumination" in subset)
    assert ("spots" in params[0]) == ("spot" in subset)
    assert ("blur" in params[0]) == ("blur" in subset)
    assert not torch.equal(out[0], image * fov)


def test_random_subsets_are_uniform_over_the_seven() -> None:
    g = _gen(11)
    codes = [sample_params(64, 64, generator=g)["code"] for _ in range(1400)]
    assert set(codes) == {"001", "010", "011", "100", "101", "110", "111"}
    assert all(150 <= codes.count(code) <= 250 for code in set(codes))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"types": ["haze"]}, "unknown degradation type"),
        ({"types": []}, "at least one"),
        ({"mode": "cofe_compat"}, "unknown degradation mode"),
    ],
)
def test_invalid_arguments_raise(kwargs: dict[str, Any], match: str) -> None:
    images, fov = _synthetic(1, 32)
    with pytest.raises(ValueError, match=match):
        degrade(images, fov, generator=_gen(0), **kwargs)


def test_non_cpu_generator_or_bad_shapes_raise() -> None:
    images, fov = _synthetic(2, 32)
    with pytest.raises(ValueError, match="fov"):
        degrade(images, fov[:1], generator=_gen(0))
    with pytest.raises(ValueError, match="images"):
        degrade(images[:, :1], None, generator=_gen(0))


def test_output_is_masked_by_the_fov(fundus: tuple[torch.Tensor, torch.Tensor]) -> None:
    image, fov = fundus
    soft = torch.from_numpy(cv2.GaussianBlur(fov[0].numpy(), (9, 9), 3))[None]
    out, params = degrade(image[None], soft[None], generator=_gen(4), types=ALL_TYPES)
    assert torch.all(out[0][:, soft[0] == 0] == 0)
    # Without illumination the FOV only enters as the final product (the hole depth reads its mean).
    out, params = degrade(image[None], soft[None], generator=_gen(4), types=["spot", "blur"])
    unmasked, _ = apply_params(image[None], None, params)
    torch.testing.assert_close(out, unmasked * soft, rtol=0, atol=1e-6)
    # The halo and spots do reach the background before masking: the mask is what removes them.
    assert unmasked[0][:, soft[0] == 0].max() > 0


def _sampled(params: dict[str, Any]) -> dict[str, Any]:
    """The drawn part of a parameter dict, without the values measured on the pixels."""
    out = json.loads(json.dumps(params))
    if "illumination" in out:
        out["illumination"]["halo"].pop("fill")
        for key in ("fov_mean", "brightness"):
            out["illumination"]["hole"].pop(key)
    return out


def test_batched_equals_sequential_with_the_same_generator() -> None:
    images, fov = _synthetic(4, 160, seed=3)
    batched, params = degrade(images, fov, generator=_gen(21))
    g = _gen(21)
    singles = [degrade(images[i : i + 1], fov[i : i + 1], generator=g) for i in range(4)]
    sequential = [p for _, ps in singles for p in ps]
    assert [_sampled(p) for p in params] == [_sampled(p) for p in sequential]
    for got, want in zip(params, sequential, strict=True):
        if "illumination" in got:
            assert got["illumination"]["halo"]["fill"] == pytest.approx(want["illumination"]["halo"]["fill"])
    torch.testing.assert_close(batched, torch.cat([out for out, _ in singles]), rtol=0, atol=1e-5)


def test_replay_from_json_reproduces_the_output(fundus: tuple[torch.Tensor, torch.Tensor]) -> None:
    image, fov = fundus
    out, params = degrade(image[None], fov[None], generator=_gen(9), types=ALL_TYPES, mode="paper")
    replayed, again = apply_params(image[None], fov[None], json.loads(json.dumps(params)))
    assert torch.equal(out, replayed)
    assert again == params


def _reference(image: np.ndarray, mask: np.ndarray, p: dict[str, Any]) -> np.ndarray:
    """Cofe-Net's released pipeline in float64 numpy + OpenCV, driven by our parameter dict."""
    x = image.astype(np.float64)
    _, h, w = x.shape
    yy, xx = np.ogrid[:h, :w]

    def luma(a: np.ndarray) -> np.ndarray:
        return 0.299 * a[0] + 0.587 * a[1] + 0.114 * a[2]

    def disk(center: list[int], radius: int) -> np.ndarray:
        return np.sqrt((xx - center[0]) ** 2 + (yy - center[1]) ** 2) <= radius

    if "illumination" in p:
        il = p["illumination"]
        x = np.clip(x * il["brightness"], 0, 1)
        x = np.clip(il["contrast"] * x + (1 - il["contrast"]) * luma(x).mean(), 0, 1)
        x = np.clip(il["saturation"] * x + (1 - il["saturation"]) * luma(x), 0, 1)
        halo = il["halo"]
        fill = x.mean()
        ring = np.abs(
            disk(halo["center"], int(halo["inner_diameter"] / 2)) * fill
            - disk(halo["center"], int(halo["outer_diameter"] / 2)) * fill
        )
        ring = cv2.GaussianBlur(ring, (halo["kernel"], halo["kernel"]), halo["sigma"])
        x = np.clip(x + np.asarray(halo["weights"])[:, None, None] * ring, 0, 1)
        hole = il["hole"]
        mean = x.sum() / (3 * mask.sum())
        depth = hole["base"] - 0.06 * mean + 0.01 * mean * hole["position"] if mean > 0.25 else 0.0
        dark = disk(hole["center"], hole["diameter"] // 2) * depth
        x = np.clip(x + cv2.GaussianBlur(dark, tuple(hole["kernel"]), hole["sigma"])[None], 0, 1)
    for spot in p.get("spots", []):
        layer = disk(spot["center"], spot["disk_radius"]) * spot["amplitude"]
        x = np.clip(x + cv2.GaussianBlur(layer, tuple(spot["kernel"]), spot["sigma"])[None], 0, 1)
    if "blur" in p:
        blurred = cv2.GaussianBlur(x.transpose(1, 2, 0), tuple(p["blur"]["kernel"]), p["blur"]["sigma"])
        x = np.clip(blurred.transpose(2, 0, 1), 0, 1)
    return x * mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_the_numpy_opencv_reference(seed: int, fundus: tuple[torch.Tensor, torch.Tensor]) -> None:
    image, fov = fundus
    out, params = degrade(image[None], fov[None], generator=_gen(seed), types=ALL_TYPES)
    expected = _reference(image.numpy(), fov.numpy(), params[0])
    assert np.abs(out[0].numpy() - expected).max() < 2e-4


def test_fft_blur_matches_opencv_for_halo_sized_kernels() -> None:
    rng = np.random.default_rng(0)
    layer = (rng.random((512, 512)) > 0.5).astype(np.float64) * rng.random()
    for ksize, sigma in [((257, 257), 171.3), ((199, 157), 159.2), ((33, 301), 40.0)]:
        expected = cv2.GaussianBlur(layer, ksize, sigma)
        kx = gaussian_kernel1d(ksize[0], sigma)[None]
        ky = gaussian_kernel1d(ksize[1], sigma)[None]
        got = fft_separable_blur(torch.from_numpy(layer).float()[None, None], kx, ky)[0, 0].numpy()
        assert np.abs(got - expected).max() < 1e-5


def test_direct_blur_and_kernel_taps_match_opencv() -> None:
    rng = np.random.default_rng(1)
    image = rng.random((2, 3, 64, 80))
    sizes = [(3, 7), (5, 1)]
    out = gaussian_blur(
        torch.from_numpy(image).float(), [s[0] for s in sizes], [s[1] for s in sizes], [9.0, 12.0]
    )
    for i, ((kx, ky), sigma) in enumerate(zip(sizes, [9.0, 12.0], strict=True)):
        expected = cv2.GaussianBlur(image[i].transpose(1, 2, 0), (kx, ky), sigma).transpose(2, 0, 1)
        assert np.abs(out[i].numpy() - expected).max() < 1e-5
    taps = gaussian_kernel1d(9, 2.5).numpy()
    assert np.allclose(taps, cv2.getGaussianKernel(9, 2.5)[:, 0])
    # The two paths agree on a mixed batch (zero-padded kernels change nothing).
    kx = stack_kernels([gaussian_kernel1d(3, 1.0), gaussian_kernel1d(11, 4.0)])
    x = torch.from_numpy(image).float()
    torch.testing.assert_close(separable_blur(x, kx, kx), fft_separable_blur(x, kx, kx), rtol=0, atol=1e-5)


def test_scaled_constants_at_1024() -> None:
    g = _gen(3)
    samples = [sample_params(1024, 1024, generator=g, types=["spot", "blur"]) for _ in range(200)]
    radii = [s["radius"] for p in samples for s in p["spots"]]
    assert min(radii) >= 11 and max(radii) <= 51
    # Spots stay bright at any size (the unscaled 512 constants turn large spots dark above r = 39).
    assert all(s["amplitude"] > 0 for p in samples for s in p["spots"])
    assert all(10 <= p["blur"]["sigma"] <= 30 for p in samples)
    assert max(k for p in samples for k in p["blur"]["kernel"]) <= 15


@pytest.mark.parametrize(("height", "width"), [(8, 8), (32, 48), (130, 97)])
@pytest.mark.parametrize("mode", ["cofe", "paper"])
def test_odd_and_tiny_sizes_work(height: int, width: int, mode: str) -> None:
    images = torch.rand(2, 3, height, width, generator=_gen(0))
    out, params = degrade(images, None, generator=_gen(1), types=ALL_TYPES, mode=mode)
    assert out.shape == images.shape
    assert out.min().item() >= 0.0 and out.max().item() <= 1.0
    assert all(s["amplitude"] > 0 for p in params for s in p["spots"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(fundus: tuple[torch.Tensor, torch.Tensor]) -> None:
    image, fov = fundus
    cpu, p_cpu = degrade(image[None], fov[None], generator=_gen(6), types=ALL_TYPES, mode="paper")
    gpu, p_gpu = degrade(
        image[None].cuda(), fov[None].cuda(), generator=_gen(6), types=ALL_TYPES, mode="paper"
    )
    assert [p["types"] for p in p_cpu] == [p["types"] for p in p_gpu]
    assert (gpu.cpu() - cpu).abs().max().item() < 1e-4


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_degrade_command_is_byte_reproducible(tmp_path: Path, data_root: Path) -> None:
    from service.cli import main

    source = tmp_path / "in"
    (source / "nested").mkdir(parents=True)
    (source / "a.jpg").write_bytes((data_root / "deepdrid" / "images" / "100_l2.jpg").read_bytes())
    (source / "nested" / "b.JPG").write_bytes((data_root / "deepdrid" / "images" / "103_l1.jpg").read_bytes())
    assert main(["degrade", str(source), str(tmp_path / "run1"), "--seed", "7", "--size", "256"]) == 0
    assert main(["degrade", str(source), str(tmp_path / "run2"), "--seed", "7", "--size", "256"]) == 0
    assert main(["degrade", str(source), str(tmp_path / "run3"), "--seed", "8", "--size", "256"]) == 0
    first, second, third = (_tree_bytes(tmp_path / f"run{i}") for i in (1, 2, 3))
    assert sorted(first) == ["a.json", "a.png", "nested/b.json", "nested/b.png"]
    assert first == second
    assert first["a.png"] != third["a.png"]

    record_a = json.loads(first["a.json"])
    record_b = json.loads(first["nested/b.json"])
    assert record_a["seed"] != record_b["seed"]  # per-file seeds
    assert record_a["params"]["seed"] == record_a["seed"]
    png = cv2.imdecode(np.frombuffer(first["a.png"], np.uint8), cv2.IMREAD_COLOR)
    assert png.shape == (256, 256, 3)
    assert png[:3, :3].max() == 0  # FOV-masked corners


def test_degrade_command_single_file_uses_the_seed(tmp_path: Path, data_root: Path) -> None:
    from service.cli import main

    source = data_root / "chase_db1" / "images" / "Image_01L.jpg"
    target = tmp_path / "out.png"
    args = ["degrade", str(source), str(target), "--seed", "3", "--types", "spot,blur", "--mode", "paper"]
    assert main([*args, "--size", "128"]) == 0
    record = json.loads((tmp_path / "out.json").read_text())
    assert record["seed"] == 3
    assert record["params"]["types"] == ["spot", "blur"] and record["params"]["mode"] == "paper"
    assert 10 <= len(record["params"]["spots"]) <= 30
    image = cv2.imread(str(target))
    assert image.shape == (128, 128, 3)


def test_degrade_command_errors_exit_2(
    tmp_path: Path, data_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.cli import main

    assert main(["degrade", str(tmp_path / "missing.png"), str(tmp_path / "o"), "--seed", "1"]) == 2
    assert "not found" in capsys.readouterr().err

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"definitely not a png")
    assert main(["degrade", str(broken), str(tmp_path / "o.png"), "--seed", "1"]) == 2
    assert "cannot decode" in capsys.readouterr().err

    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.zeros((200, 200, 3), np.uint8))
    assert main(["degrade", str(blank), str(tmp_path / "b.png"), "--seed", "1"]) == 2
    assert "field of view" in capsys.readouterr().err

    good = data_root / "deepdrid" / "images" / "100_l2.jpg"
    assert main(["degrade", str(good), str(tmp_path / "g.png"), "--seed", "1", "--types", "haze"]) == 2
    assert "--types" in capsys.readouterr().err
