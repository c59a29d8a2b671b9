"""Named model configurations (DESIGN §3).

* ``paper``: MODEL_SPEC §1.3 widths (n/s/o = 40/20/16, 8 CABs per FAB, full AG-Net width 32 with
  GroupNorm(32)); about 12 M parameters; for GPUs.
* ``lite``: the CPU default, same structure with fewer channels and CABs, at most 60 GFLOPs for one
  512×512 image (``fundus info --preset lite`` prints the measured count).
* ``mid``: between the two, for when ``lite`` runs out of capacity on a CPU: three times ``lite``'s
  enhancement parameters (511 k) around the same vessel branch, so a ``lite`` phase-1 branch can guide
  it; one 512×512 forward takes about 1.5 s on two CPU cores (``lite``: 0.8 s), and ``/enhance`` with
  its trust signals answers in 1.8 s (p50, ``bench/serve_bench.py --preset mid``).
* ``tiny``: a few thousand parameters, for tests only.
"""

from __future__ import annotations

from dataclasses import replace

from model.config import MageNetConfig, VesselNetConfig

_LITE = MageNetConfig(
    n_feat=12,
    scale_unetfeats=8,
    scale_orsnetfeats=6,
    num_cab=2,
    unet_cabs=2,
    cab_reduction=4,
    fusion_kernel=1,
    vessels=VesselNetConfig(width=8, norm_groups=8),
)

PRESETS: dict[str, MageNetConfig] = {
    "paper": MageNetConfig(),
    "lite": _LITE,
    # lite's vessel branch and block layout with wider, deeper enhancement stages.
    "mid": replace(_LITE, n_feat=20, scale_unetfeats=12, scale_orsnetfeats=8, num_cab=4),
    "tiny": MageNetConfig(
        n_feat=4,
        scale_unetfeats=2,
        scale_orsnetfeats=2,
        num_cab=1,
        unet_cabs=1,
        cab_reduction=2,
        fusion_kernel=1,
        vessels=VesselNetConfig(width=2, norm_groups=1),
        working_size=64,
    ),
}


def get_preset(name: str) -> MageNetConfig:
    """The configuration called ``name``; a ``ValueError`` lists the valid names otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown model preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}"
        ) from None
