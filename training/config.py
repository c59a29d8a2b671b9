"""Training run configuration: YAML → nested frozen-free dataclasses, unknown keys are errors.

One YAML file describes a whole experiment (data, model preset, the three phases, logging); each
phase reads its own section. ``--set a.b=value`` overrides are applied to the raw mapping before
it is turned into dataclasses, so an override with a typo fails exactly like a typo in the file.
Values of overrides are parsed as YAML scalars (``--set enhance.steps=100``, ``--set
data.clean_sets=[hrf]``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

VESSEL_ANCHORS = ("frozen", "distill", "free")


class ConfigError(ValueError):
    """The configuration file or an override is invalid."""


@dataclass
class RunConfig:
    """Where a run lives and what it runs on.

    Attributes:
        name: experiment name; phase folders are ``<out_root>/<name>/<phase>``.
        out_root: parent of all run folders (relative paths resolve against the working directory).
        device: ``auto``, ``cpu`` or ``cuda[:N]`` (under torchrun the local rank picks the GPU).
        seed: master seed of model init, data order, augmentation and degradation.
        amp: mixed precision on CUDA (ignored on CPU).
        num_workers: DataLoader worker processes (0 loads in the training process).
        threads: torch intra-op threads (0 = torch's default). On a busy shared CPU, 1 thread
            avoids OpenMP oversubscription, which can slow small convolutions tenfold.
    """

    name: str = "default"
    out_root: str = "runs"
    device: str = "auto"
    seed: int = 0
    amp: bool = True
    num_workers: int = 0
    threads: int = 0


@dataclass
class DataConfig:
    """Data sources, roles and the split.

    Attributes:
        root: data root holding ``<set>/{images,vessels,fov}`` folders and ``splits.json``.
        cache_dir: FOV-cropped working-size copies are cached here (per set and size).
        working_size: square size images are FOV-cropped and resized to once.
        crop_size: training crop side taken from the working image (``0`` = no crop).
        clean_sets: folder sets whose images are clean targets of synthetic pairs.
        vessel_sets: folder sets whose manual vessel masks supervise the vessel branch.
        unlabeled_sets: folder sets whose images are unlabeled real images.
        quality_sets: folder sets with a ``quality.csv`` (DeepDRiD style): rows with
            ``overall_quality`` 0 are unlabeled real low-quality images.
        quality_clean_sets: sets with a ``quality.csv`` whose ``overall_quality`` 1 rows are clean
            targets of synthetic pairs (good photographs of the same cameras as the poor ones).
        eyeq_images: EyeQ image folder (empty = not used).
        eyeq_csv: EyeQ label CSV (``quality`` 0 Good → clean, 1 Usable → unlabeled real).
        unlabeled_dirs: plain folders of unlabeled real low-quality images.
        limit_per_set: keep at most this many images of each set and role (0 = all); for smoke runs.
        val_fraction: share of each set's non-test images held out for validation.
        val_max: cap on validation images per set.
        split_seed: seed of the train/validation draw.
        val_images: number of fixed degraded validation images of phase 2 (taken from the clean
            sets in turn).
        val_native_max_side: phase-2 validation also degrades and restores each validation
            photograph at its own geometry, its longer side scaled to at most this (0 = as
            stored, -1 = skip the native-resolution check).
    """

    root: str = "../shared/data"
    cache_dir: str = "runs/cache"
    working_size: int = 512
    crop_size: int = 256
    clean_sets: list[str] = field(default_factory=lambda: ["hrf", "fives", "idrid"])
    vessel_sets: list[str] = field(default_factory=lambda: ["hrf", "chase_db1", "fives"])
    unlabeled_sets: list[str] = field(default_factory=lambda: ["chase_db1"])
    quality_sets: list[str] = field(default_factory=lambda: ["deepdrid"])
    quality_clean_sets: list[str] = field(default_factory=list)
    eyeq_images: str = ""
    eyeq_csv: str = ""
    unlabeled_dirs: list[str] = field(default_factory=list)
    limit_per_set: int = 0
    val_fraction: float = 0.1
    val_max: int = 8
    split_seed: int = 0
    val_images: int = 4
    val_native_max_side: int = 1024


@dataclass
class ModelConfig:
    """Which architecture to train.

    Attributes:
        preset: ``paper``, ``lite`` or ``tiny``.
    """

    preset: str = "lite"


@dataclass
class OptimConfig:
    """Adam + linear warm-up + cosine decay, gradient clipping.

    Attributes:
        lr: peak learning rate.
        lr_min: final learning rate of the cosine.
        warmup_steps: linear warm-up length.
        betas: Adam betas.
        weight_decay: Adam weight decay.
        grad_clip: max global gradient norm (0 disables clipping).
    """

    lr: float = 2e-4
    lr_min: float = 1e-6
    warmup_steps: int = 0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    grad_clip: float = 1.0


@dataclass
class LoggingConfig:
    """How often to log, validate and checkpoint (in iterations).

    Attributes:
        log_every: CSV/TensorBoard scalar interval.
        val_every: validation interval (0 = only at the end).
        checkpoint_every: checkpoint interval (0 = only at exit).
        tensorboard: also write TensorBoard event files when the package is installed.
        progress: show a tqdm progress bar.
    """

    log_every: int = 10
    val_every: int = 100
    checkpoint_every: int = 200
    tensorboard: bool = True
    progress: bool = True


@dataclass
class RspPhaseConfig:
    """Phase 1: vessel branch (RSP) pretraining on manual masks.

    Attributes:
        steps: iterations.
        batch_size: images per iteration (per process).
        include_avg: also supervise the averaged output (AG-Net does), besides the 4 sides.
        degrade_prob: share of training images given a Cofe-Net degradation first (the mask stays
            the clean one), so the branch reads vessels through the degradations it later guides
            the restorer on. 0 = clean photographs only (AG-Net).
        degradation_mode: ``cofe`` or ``paper``.
        optim: optimiser and schedule.
    """

    steps: int = 2000
    batch_size: int = 2
    include_avg: bool = True
    degrade_prob: float = 0.0
    degradation_mode: str = "cofe"
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1.5e-3, lr_min=1e-5))


@dataclass
class SegmenterPhaseConfig:
    """The independent evaluation segmenter (:mod:`training.segmenter`), clean photographs only.

    Attributes:
        steps: iterations.
        batch_size: images per iteration (per process).
        width: first-level width of the U-Net.
        weights: segmenter used by validation and ``fundus eval``; empty = this run's
            ``<run>/segmenter/segmenter.safetensors``, else the shipped one is used when present.
        optim: optimiser and schedule.
    """

    steps: int = 1500
    batch_size: int = 4
    width: int = 16
    weights: str = ""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, lr_min=1e-5, warmup_steps=50))


@dataclass
class QualityPhaseConfig:
    """The image-quality grader (:mod:`model.quality`, :mod:`training.phase_quality`).

    Attributes:
        set: folder set with a ``quality.csv`` (patient ids, ``overall_quality``).
        epochs, batch_size, lr: schedule (AdamW, one-cycle).
        width: first-block width of the CNN.
        val_fraction, test_fraction: shares of the patients held out for validation and test.
        degrade_good_prob: chance a good photograph of the set is Cofe-degraded into a poor example
            (clean extras: one in two).
        ranking_weight: weight of the pairwise term ranking each degraded copy below its original.
    """

    set: str = "deepdrid"
    epochs: int = 16
    batch_size: int = 32
    lr: float = 2e-3
    width: int = 16
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    degrade_good_prob: float = 0.25
    ranking_weight: float = 1.0


@dataclass
class PseudoPhaseConfig:
    """Pseudo-mask generation with the pretrained vessel branch.

    Attributes:
        rsp_checkpoint: vessel weights; empty = ``<run>/rsp/rsp.safetensors`` of this config.
        out_dir: where masks go; empty = ``<run>/pseudo-masks``.
        threshold: probability above which a pixel is a vessel.
        batch_size: images per forward pass.
    """

    rsp_checkpoint: str = ""
    out_dir: str = ""
    threshold: float = 0.5
    batch_size: int = 4


@dataclass
class LossConfig:
    """Phase-2 loss weights (MODEL_SPEC §1.4–1.5).

    Attributes:
        charbonnier_eps: ε of the Charbonnier and edge losses.
        edge_weight: w_e, weight of the edge loss per stage.
        seg_weight: λ, weight of the summed per-scale segmentation cross-entropy.
        seg_include_avg: also supervise the averaged vessel output.
        consistency_weight: w_max of the consistency term (0 = MAGE-Net only, no teacher-student).
        rampup_steps: length of the sigmoid ramp-up of the consistency weight (-1 = 20 % of the
            phase's steps).
        noise_std: σ of the Gaussian noise added to the teacher's input inside the FOV.
        stages: supervised image stages: ``[1]`` = stage-1 only, ``[1, 2]`` = both (Table 6 rows).
        use_rsp: supervise the vessel branch and initialise it from phase 1; ``false`` trains the
            restorer without vessel supervision (branch randomly initialised, no seg loss).
        consistency_on_vessels: include the vessel scales in the consistency term.
        vessel_anchor: how the vessel branch is kept on its phase-1 behaviour. ``frozen``: not
            trained in phase 2 at all (the paper's "pre-trained AG-Net" used as a fixed guide);
            ``distill``: trained at ``vessel_lr_scale`` of the learning rate, with the vessel
            losses plus ``anchor_weight`` · MSE between its probabilities and those of the frozen
            phase-1 branch on every input; ``free``: trained like the rest (drifts on real
            photographs that only the consistency term sees).
        anchor_weight: weight of the distillation term (``distill`` only).
        vessel_lr_scale: learning-rate factor of the vessel branch (``distill`` and ``free``).
        real_vessel_weight: weight of the cross-entropy on the manual masks of unlabeled real
            photographs (e.g. CHASE_DB1), which keeps the trainable branch calibrated on real
            images and not only on synthetic ones.
        structure_weight: weight of the structure term: MSE inside the FOV between the vessel
            probabilities the frozen phase-1 branch sees in the restored image and in the clean
            target. It penalises restorations that smooth vessels away or invent them, which
            Charbonnier and PSNR barely notice.
    """

    charbonnier_eps: float = 1e-3
    edge_weight: float = 0.05
    seg_weight: float = 0.5
    seg_include_avg: bool = False
    consistency_weight: float = 1.0
    rampup_steps: int = -1
    noise_std: float = 0.03
    stages: list[int] = field(default_factory=lambda: [1, 2])
    use_rsp: bool = True
    consistency_on_vessels: bool = True
    vessel_anchor: str = "free"
    anchor_weight: float = 1.0
    vessel_lr_scale: float = 1.0
    real_vessel_weight: float = 0.0
    structure_weight: float = 0.0


@dataclass
class EnhancePhaseConfig:
    """Phase 2: mean-teacher T-MAGE-Net training.

    Attributes:
        steps: iterations.
        batch_labeled: synthetic pairs per iteration (per process).
        batch_unlabeled: unlabeled real images per iteration (per process).
        ema_decay: α of the EMA teacher.
        rsp_checkpoint: vessel weights from phase 1; empty = ``<run>/rsp/rsp.safetensors``. A model
            artifact is accepted (its vessel branch).
        init_weights: a model artifact of the same preset whose weights start the student and the
            teacher (fine-tuning shipped weights with another recipe); empty = random restorer.
        pseudo_dir: pseudo-mask folder; empty = ``<run>/pseudo-masks``.
        degradation_mode: ``cofe`` or ``paper``.
        degrade_full: degrade the whole working image, then crop (keeps the degradation statistics
            of the 512² working size); ``false`` degrades the crops (cheaper).
        identity_prob: share of synthetic pairs left undegraded (input = target), so the restorer
            learns to leave good photographs alone ("do no harm") instead of applying the mean
            correction of degraded ones.
        export: write the weight artifact ``<run>/enhance/teacher.safetensors`` at the end.
        export_source: ``teacher`` (EMA weights, the default) or ``student``.
        loss: loss weights and ablation switches.
        optim: optimiser and schedule.
    """

    steps: int = 20000
    batch_labeled: int = 16
    batch_unlabeled: int = 8
    ema_decay: float = 0.999
    rsp_checkpoint: str = ""
    init_weights: str = ""
    pseudo_dir: str = ""
    degradation_mode: str = "cofe"
    degrade_full: bool = True
    identity_prob: float = 0.0
    export: bool = True
    export_source: str = "teacher"
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class TrainConfig:
    """A whole experiment: shared run/data/model settings plus one section per phase."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    rsp: RspPhaseConfig = field(default_factory=RspPhaseConfig)
    segmenter: SegmenterPhaseConfig = field(default_factory=SegmenterPhaseConfig)
    quality: QualityPhaseConfig = field(default_factory=QualityPhaseConfig)
    pseudo: PseudoPhaseConfig = field(default_factory=PseudoPhaseConfig)
    enhance: EnhancePhaseConfig = field(default_factory=EnhancePhaseConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def phase_dir(self, phase: str) -> Path:
        """Folder of one phase of this run: ``<out_root>/<name>/<phase>``."""
        return Path(self.run.out_root) / self.run.name / phase


def _convert(tp: Any, value: Any, where: str) -> Any:
    """Check/convert one YAML value against a dataclass field type."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, where)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_convert(item_tp, item, f"{where}[{i}]") for i, item in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML reads "1e-3" (no dot) as a string; accept any numeric literal.
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, str | int | float):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown config key(s): {', '.join(prefix + k for k in unknown)}")
    base = cls()
    values: dict[str, Any] = {}
    for name in names:
        sub = f"{where}.{name}" if where else name
        if name in data:
            tp = hints[name]
            if dataclasses.is_dataclass(tp):
                merged = dataclasses.asdict(getattr(base, name))
                merged.update(data[name] or {})
                values[name] = _convert(tp, merged, sub)
            else:
                values[name] = _convert(tp, data[name], sub)
    return cls(**values)


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one ``a.b.c=value`` override to a raw (nested dict) config in place."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} is not of the form key=value")
    key, text = assignment.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {assignment!r} has an empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {assignment!r}: value is not valid YAML: {exc}") from exc
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = {}
            node[part] = child
        if not isinstance(child, dict):
            raise ConfigError(f"override {assignment!r}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def config_from_dict(raw: dict[str, Any], overrides: list[str] | None = None) -> TrainConfig:
    """Build a validated ``TrainConfig`` from a nested mapping plus ``key=value`` overrides."""
    data = yaml.safe_load(yaml.safe_dump(raw or {}))  # deep copy through YAML semantics
    for assignment in overrides or []:
        apply_override(data, assignment)
    config: TrainConfig = _build(TrainConfig, data, "")
    validate(config)
    return config


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config file and apply overrides."""
    source = Path(path)
    if not source.is_file():
        raise ConfigError(f"config file not found: {source}")
    try:
        raw = yaml.safe_load(source.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping")
    return config_from_dict(raw, overrides)


def validate(config: TrainConfig) -> None:
    """Cross-field checks that a type check cannot express."""
    d = config.data
    if d.working_size <= 0 or d.working_size % 8:
        raise ConfigError("data.working_size must be a positive multiple of 8")
    if d.crop_size < 0 or d.crop_size > d.working_size or d.crop_size % 8:
        raise ConfigError("data.crop_size must be 0 or a multiple of 8 not above data.working_size")
    if not 0.0 <= d.val_fraction < 1.0:
        raise ConfigError("data.val_fraction must be in [0, 1)")
    loss = config.enhance.loss
    if not loss.stages or any(s not in (1, 2) for s in loss.stages):
        raise ConfigError("enhance.loss.stages must be a non-empty subset of [1, 2]")
    if not 0.0 <= config.enhance.ema_decay <= 1.0:
        raise ConfigError("enhance.ema_decay must be in [0, 1]")
    if config.enhance.export_source not in ("teacher", "student"):
        raise ConfigError("enhance.export_source must be teacher or student")
    for name, mode in (("enhance", config.enhance.degradation_mode), ("rsp", config.rsp.degradation_mode)):
        if mode not in ("cofe", "paper"):
            raise ConfigError(f"{name}.degradation_mode must be cofe or paper")
    for name, value in (
        ("rsp.degrade_prob", config.rsp.degrade_prob),
        ("enhance.identity_prob", config.enhance.identity_prob),
    ):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{name} must be in [0, 1]")
    if loss.vessel_anchor not in VESSEL_ANCHORS:
        raise ConfigError(f"enhance.loss.vessel_anchor must be one of {', '.join(VESSEL_ANCHORS)}")
    for name, steps in (
        ("rsp", config.rsp.steps),
        ("segmenter", config.segmenter.steps),
        ("enhance", config.enhance.steps),
    ):
        if steps <= 0:
            raise ConfigError(f"{name}.steps must be positive")
    if config.enhance.batch_labeled <= 0 or config.rsp.batch_size <= 0:
        raise ConfigError("batch sizes must be positive")
    if config.enhance.batch_unlabeled < 0:
        raise ConfigError("enhance.batch_unlabeled must be >= 0")


def dump_config(config: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (the exact run can be repeated from this file)."""
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
