"""Frozen configuration dataclasses for MAGE-Net and its vessel (RSP) branch.

A config fully determines the architecture: a weight artifact stores ``MageNetConfig.to_dict()``
in its metadata, and ``MageNetConfig.from_dict`` rebuilds exactly the same network without any
YAML file. Unknown keys are rejected so that a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


def _check_keys(cls: type, data: dict[str, Any]) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {', '.join(unknown)}")


@dataclass(frozen=True)
class VesselNetConfig:
    """AG-Net style vessel segmenter (the retinal-structure-preservation branch).

    Attributes:
        width: channels of the first encoder level; levels use width × (1, 2, 4, 8) and the
            centre block width × 16 (AG-Net: 32).
        norm_groups: GroupNorm groups; must divide ``width`` (AG-Net: 32).
        guided_filter_radius: box radius of the attention-guided filter (AG-Net: 2).
        guided_filter_eps: regulariser of the attention-guided filter (AG-Net: 1e-2).
    """

    width: int = 32
    norm_groups: int = 32
    guided_filter_radius: int = 2
    guided_filter_eps: float = 1e-2

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VesselNetConfig:
        _check_keys(cls, data)
        return cls(**data)


@dataclass(frozen=True)
class MageNetConfig:
    """MAGE-Net: Stage-1 U-Net + Stage-2 full-resolution FABs, guided by the vessel branch.

    Attributes:
        n_feat: base width n (paper preset 40).
        scale_unetfeats: width step s of the Stage-1 U-Net levels (n, n+s, n+2s).
        scale_orsnetfeats: extra width o of Stage-2 (width n+o).
        num_cab: channel-attention blocks inside each fundus attention block (paper 8).
        unet_cabs: channel-attention blocks per Stage-1 encoder/decoder level (MPRNet 2).
        cab_reduction: channel-attention reduction ratio r.
        rsp_to_fab: for each of the three FABs, which vessel decoder feature it concatenates
            (0 = H/8, 1 = H/4, 2 = H/2, 3 = H; default H/4, H/2, H).
        fusion_kernel: kernel size of the FAB's learnable non-linear transformation filter, the
            conv from (n+o + vessel channels) back to n+o (1 or 3; our reconstruction).
        vessels: the vessel branch configuration.
        working_size: the square size images are normalised to before the model runs.
    """

    n_feat: int = 40
    scale_unetfeats: int = 20
    scale_orsnetfeats: int = 16
    num_cab: int = 8
    unet_cabs: int = 2
    cab_reduction: int = 4
    rsp_to_fab: tuple[int, int, int] = (1, 2, 3)
    fusion_kernel: int = 3
    vessels: VesselNetConfig = field(default_factory=VesselNetConfig)
    working_size: int = 512

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["rsp_to_fab"] = list(self.rsp_to_fab)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MageNetConfig:
        _check_keys(cls, data)
        values = dict(data)
        if "vessels" in values:
            values["vessels"] = VesselNetConfig.from_dict(dict(values["vessels"]))
        if "rsp_to_fab" in values:
            values["rsp_to_fab"] = tuple(int(i) for i in values["rsp_to_fab"])
        return cls(**values)
