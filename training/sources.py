"""Discover images, give each a role, and draw the deterministic train/validation/test split.

Sources:
    (a) folder sets ``<root>/<set>/{images,vessels,fov}`` (masks share the image's stem);
    (b) EyeQ: an image folder plus ``Label_EyeQ_train.csv`` (``quality`` 0 Good → clean,
        1 Usable → unlabeled real, 2 Reject → unused);
    (c) plain folders of unlabeled real images;
    plus ``quality.csv`` of DeepDRiD-style sets (``overall_quality`` 0 = poor → unlabeled real,
    1 = good → clean target when the set is in ``quality_clean_sets``).

Roles of a training image: ``clean`` (target of synthetic pairs), ``vessel`` (manual vessel mask
supervises the vessel branch), ``pseudo`` (clean image without a manual mask: gets a pseudo-mask),
``unlabeled`` (real low-quality image for the consistency term). Held-out images have the single
role ``val`` or ``test``. The test split of ``splits.json`` never enters training or validation.
"""

from __future__ import annotations

import csv
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from training.config import DataConfig

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
ROLES = ("clean", "vessel", "pseudo", "unlabeled", "val", "test")


@dataclass
class ImageRecord:
    """One image and its optional masks.

    Attributes:
        set: source name (folder set name, ``eyeq`` or ``dir:<folder name>``).
        stem: file stem, unique within the set.
        image: path of the photograph.
        vessel: manual vessel mask (0/255), or None.
        fov: field-of-view mask (0/255), or None (then it is detected).
        roles: the image's roles (see module docstring).
    """

    set: str
    stem: str
    image: Path
    vessel: Path | None = None
    fov: Path | None = None
    roles: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.set}/{self.stem}"

    @property
    def training_roles(self) -> list[str]:
        return [r for r in self.roles if r not in ("val", "test")]


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _mask_for(folder: Path, stem: str) -> Path | None:
    for suffix in (".png", ".tif", ".tiff", ".gif", ".jpg", ".bmp"):
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def folder_set(root: Path, name: str) -> list[ImageRecord]:
    """Records of ``<root>/<name>/images`` with their vessel and FOV masks where present."""
    base = root / name
    return [
        ImageRecord(name, p.stem, p, _mask_for(base / "vessels", p.stem), _mask_for(base / "fov", p.stem))
        for p in list_images(base / "images")
    ]


def quality_stems(root: Path, name: str, quality: str) -> set[str]:
    """Stems whose ``overall_quality`` is ``quality`` (``"0"`` poor, ``"1"`` good) in
    ``<root>/<name>/quality.csv`` (empty if there is no such file)."""
    table = root / name / "quality.csv"
    if not table.is_file():
        return set()
    with table.open(newline="") as handle:
        return {
            row["stem"]
            for row in csv.DictReader(handle)
            if str(row.get("overall_quality", "")).strip() == quality
        }


def quality_poor_stems(root: Path, name: str) -> set[str]:
    """Stems of poor-quality photographs (``overall_quality`` 0) of a DeepDRiD-style set."""
    return quality_stems(root, name, "0")


def eyeq_records(images: Path, labels: Path) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(Good, Usable) records of an EyeQ label CSV (columns ``image``, ``quality``)."""
    good: list[ImageRecord] = []
    usable: list[ImageRecord] = []
    with labels.open(newline="") as handle:
        for row in csv.DictReader(handle):
            name = (row.get("image") or "").strip()
            quality = str(row.get("quality", "")).strip()
            path = images / name
            if name and not path.is_file():
                # Preprocessed EyeQ copies are often PNG while the CSV names the original JPEG.
                path = next(
                    (p for p in (images / f"{Path(name).stem}{s}" for s in IMAGE_SUFFIXES) if p.is_file()),
                    path,
                )
            if not name or not path.is_file():
                continue
            record = ImageRecord("eyeq", Path(name).stem, path)
            if quality == "0":
                good.append(record)
            elif quality == "1":
                usable.append(record)
    return good, usable


def load_test_keys(root: Path) -> set[str]:
    """``set/stem`` keys of the fixed test split in ``<root>/splits.json`` (empty if absent)."""
    path = root / "splits.json"
    if not path.is_file():
        return set()
    test = json.loads(path.read_text()).get("test", {})
    return {f"{name}/{stem}" for name, stems in test.items() for stem in stems}


@dataclass
class Split:
    """All records with their roles, plus convenience views."""

    records: list[ImageRecord]

    def with_role(self, role: str) -> list[ImageRecord]:
        return [r for r in self.records if role in r.roles]

    def held_out_clean(self, config: DataConfig) -> list[ImageRecord]:
        """Validation photographs of the sets whose images are clean targets (good photographs that
        training never saw)."""
        clean_sets = set(config.clean_sets) | set(config.quality_clean_sets) | {"eyeq"}
        return [r for r in self.with_role("val") if r.set in clean_sets]

    def counts(self) -> dict[str, dict[str, int]]:
        """{role: {set: count}} for the training summary."""
        table: dict[str, Counter[str]] = {role: Counter() for role in ROLES}
        for record in self.records:
            for role in record.roles:
                table[role][record.set] += 1
        return {role: dict(sorted(c.items())) for role, c in table.items() if c}

    def write(self, folder: Path) -> None:
        """``roles.csv`` (one row per image) and ``split.json`` (keys per role) in ``folder``."""
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / "roles.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["set", "stem", "roles", "image", "vessel_mask", "fov_mask"])
            for r in self.records:
                writer.writerow(
                    [r.set, r.stem, ";".join(r.roles), str(r.image), str(r.vessel or ""), str(r.fov or "")]
                )
        payload = {role: [r.key for r in self.with_role(role)] for role in ROLES}
        payload["counts"] = self.counts()  # type: ignore[assignment]
        (folder / "split.json").write_text(json.dumps(payload, indent=1))


def _limit(records: list[ImageRecord], limit: int, seed: int, tag: str) -> list[ImageRecord]:
    if limit <= 0 or len(records) <= limit:
        return records
    rng = random.Random(f"{seed}:{tag}")
    picked = rng.sample(range(len(records)), limit)
    return [records[i] for i in sorted(picked)]


def build_split(config: DataConfig) -> Split:
    """Deterministic roles and split for a data config (same config → same split on any machine)."""
    root = Path(config.root)
    test_keys = load_test_keys(root)
    records: dict[str, ImageRecord] = {}

    def add(record: ImageRecord, role: str) -> None:
        existing = records.setdefault(record.key, record)
        if role not in existing.roles:
            existing.roles.append(role)

    folder_names = sorted(set(config.clean_sets) | set(config.vessel_sets) | set(config.unlabeled_sets))
    for name in folder_names:
        found = folder_set(root, name)
        if not found:
            raise FileNotFoundError(f"data set {name!r} has no images under {root / name / 'images'}")
        candidates = [r for r in found if r.key not in test_keys]
        for record in [r for r in found if r.key in test_keys]:
            add(record, "test")
        candidates = _limit(candidates, config.limit_per_set, config.split_seed, name)
        held_out = (
            _validation_keys(candidates, config, name)
            if name in (set(config.clean_sets) | set(config.vessel_sets))
            else set()
        )
        for record in candidates:
            if record.key in held_out:
                add(record, "val")
                continue
            if name in config.clean_sets:
                add(record, "clean")
            if name in config.vessel_sets and record.vessel is not None:
                add(record, "vessel")
            if name in config.unlabeled_sets:
                add(record, "unlabeled")
    for name in config.quality_sets:
        poor = quality_poor_stems(root, name)
        found = [r for r in folder_set(root, name) if r.stem in poor and r.key not in test_keys]
        for record in _limit(found, config.limit_per_set, config.split_seed, f"{name}:poor"):
            add(record, "unlabeled")
    for name in config.quality_clean_sets:
        good = quality_stems(root, name, "1")
        found = [r for r in folder_set(root, name) if r.stem in good and r.key not in test_keys]
        found = _limit(found, config.limit_per_set, config.split_seed, f"{name}:good")
        held_out = _validation_keys(found, config, f"{name}:good")
        for record in found:
            add(record, "val" if record.key in held_out else "clean")
    if config.eyeq_images and config.eyeq_csv:
        good, usable = eyeq_records(Path(config.eyeq_images), Path(config.eyeq_csv))
        good = _limit(good, config.limit_per_set, config.split_seed, "eyeq:good")
        held_out = _validation_keys(good, config, "eyeq")
        for record in good:
            add(record, "val" if record.key in held_out else "clean")
        for record in _limit(usable, config.limit_per_set, config.split_seed, "eyeq:usable"):
            add(record, "unlabeled")
    for folder in config.unlabeled_dirs:
        path = Path(folder)
        found = [ImageRecord(f"dir:{path.name}", p.stem, p) for p in list_images(path)]
        for record in _limit(found, config.limit_per_set, config.split_seed, f"dir:{path}"):
            add(record, "unlabeled")
    # A clean image without a manual mask gets a pseudo-mask from the pretrained vessel branch.
    for record in records.values():
        if "clean" in record.roles and "vessel" not in record.roles:
            record.roles.append("pseudo")
    ordered = sorted(records.values(), key=lambda r: (r.set, r.stem))
    return Split(ordered)


def _validation_keys(candidates: list[ImageRecord], config: DataConfig, tag: str) -> set[str]:
    """Seeded validation draw: ``val_fraction`` of the set (at least 1 when > 0), at most ``val_max``."""
    if config.val_fraction <= 0 or len(candidates) < 2:
        return set()
    count = min(max(1, round(len(candidates) * config.val_fraction)), config.val_max, len(candidates) - 1)
    rng = random.Random(f"{config.split_seed}:val:{tag}")
    return {candidates[i].key for i in rng.sample(range(len(candidates)), count)}
