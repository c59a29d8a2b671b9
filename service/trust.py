"""Trust signals on the way out of ``/enhance``: quality grades, uncertainty and structure fidelity.

The figures come from :mod:`model.quality` (the grader, run here in the API process: a few
milliseconds per image) and from the model worker (:mod:`model.trust`, carried in the
:class:`~service.queue.base.JobResult`). This module turns them into response headers, metrics and
the one-line summary written into DICOM answers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.quality import QualityGrade, QualityModel, grade_of
from service.metrics import Metrics
from service.queue.base import JobResult

FIDELITY_KEYS = ("dice", "removed", "added")
#: What derived DICOM instances say they are (Derivation Description), before the trust figures.
ENHANCE_DESCRIPTION = "T-MAGE-Net enhancement"
SEGMENT_DESCRIPTION = "T-MAGE-Net vessel probability"


@dataclass
class TrustReport:
    """What an enhancement response says about itself.

    Attributes:
        before / after: quality grades of the input and of the output (None without a grader).
        uncertainty: mean stage disagreement inside the FOV, on [0, 1] (None without trust signals).
        fidelity: ``{"dice", "removed", "added"}`` of the vessel maps (None without trust signals).
        min_dice: the Dice below which the answer carries ``X-Structure-Warning``.
    """

    before: QualityGrade | None = None
    after: QualityGrade | None = None
    uncertainty: float | None = None
    fidelity: dict[str, float] | None = None
    min_dice: float = 0.0

    @property
    def structure_warning(self) -> str | None:
        if self.fidelity is None or self.fidelity["dice"] >= self.min_dice:
            return None
        return (
            f"vessel map changed: dice {self.fidelity['dice']:.3f} < {self.min_dice:.2f}, "
            f"{self.fidelity['removed']:.0%} of vessel pixels removed, {self.fidelity['added']:.0%} added"
        )

    def headers(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.before is not None:
            out["X-Quality-Before"] = self.before.header()
        if self.after is not None:
            out["X-Quality-After"] = self.after.header()
        if self.uncertainty is not None:
            out["X-Enhance-Uncertainty"] = f"{self.uncertainty:.4f}"
        if self.fidelity is not None:
            f = self.fidelity
            out["X-Structure-Fidelity"] = (
                f"dice={f['dice']:.3f};removed={f['removed']:.3f};added={f['added']:.3f}"
            )
        warning = self.structure_warning
        if warning is not None:
            out["X-Structure-Warning"] = warning
        return out

    def summary(self) -> str:
        """One line for a DICOM Derivation Description, e.g.
        ``quality poor p=0.12 -> good p=0.91; uncertainty 0.0132; vessel dice 0.861``."""
        parts = []
        if self.before is not None and self.after is not None:
            parts.append(
                f"quality {self.before.header().replace(';', ' ')} -> {self.after.header().replace(';', ' ')}"
            )
        elif self.before is not None:
            parts.append(f"quality {self.before.header().replace(';', ' ')}")
        if self.uncertainty is not None:
            parts.append(f"uncertainty {self.uncertainty:.4f}")
        if self.fidelity is not None:
            parts.append(
                f"vessel dice {self.fidelity['dice']:.3f} (removed {self.fidelity['removed']:.3f}, "
                f"added {self.fidelity['added']:.3f})"
            )
            if self.structure_warning is not None:
                parts.append("STRUCTURE WARNING")
        return "; ".join(parts)

    def observe(self, metrics: Metrics) -> None:
        """Record the figures of an enhancement that was run."""
        if self.before is not None:
            metrics.quality_before.observe(self.before.probabilities["good"])
        if self.after is not None:
            metrics.quality_after.observe(self.after.probabilities["good"])
        if self.uncertainty is not None:
            metrics.uncertainty.observe(self.uncertainty)
        if self.fidelity is not None:
            metrics.structure_dice.observe(self.fidelity["dice"])
            if self.structure_warning is not None:
                metrics.structure_warnings.inc()


def grade_working(grader: QualityModel | None, working: np.ndarray) -> QualityGrade | None:
    """Grade a uint8 working image, [S, S, 3] RGB or the queue layout [3, S, S]; None without a grader."""
    if grader is None:
        return None
    image = working.transpose(1, 2, 0) if working.ndim == 3 and working.shape[0] == 3 else working
    return grader.grade(np.ascontiguousarray(image))


def enhancement_report(
    grader: QualityModel | None,
    before: QualityGrade | None,
    result: JobResult,
    min_dice: float,
    working: np.ndarray | None = None,
) -> TrustReport:
    """The report of a finished enhancement.

    The model process grades input and output inside its pass (``result.quality_before`` /
    ``quality_after``); where it did not (a worker without a grader), the API's ``grader`` grades the
    ``working`` input and the output here (CPU work: run it in the pool). ``before`` is a grade the
    request already has (``only_if_needed``).
    """
    version = grader.version if grader is not None else "quality"
    if before is None:
        if result.quality_before is not None:
            before = grade_of(result.quality_before, version)
        elif working is not None:
            before = grade_working(grader, working)
    if result.quality_after is not None:
        after: QualityGrade | None = grade_of(result.quality_after, version)
    else:
        after = grade_working(grader, result.image) if result.image is not None else None
    return TrustReport(
        before=before,
        after=after,
        uncertainty=result.uncertainty_mean,
        fidelity=result.fidelity,
        min_dice=min_dice,
    )


def derivation_description(enhanced: bool, trust: TrustReport) -> str:
    """``T-MAGE-Net enhancement; quality poor p=0.124 -> good p=0.871; ...`` for an enhancement,
    ``T-MAGE-Net vessel probability`` for a vessel map (the same text over HTTP and DIMSE)."""
    base = ENHANCE_DESCRIPTION if enhanced else SEGMENT_DESCRIPTION
    return "; ".join(part for part in (base, trust.summary()) if part)
