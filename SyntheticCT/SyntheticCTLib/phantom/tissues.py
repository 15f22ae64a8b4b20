"""Tissue labels and the phantom's one table of tissue parameters (MRI relaxation and CT numbers).

Label values (``labels.nii.gz``)
--------------------------------
0 air, 1 skin, 2 subcutaneous fat, 3 muscle, 4 cortical bone, 5 trabecular bone, 6 intervertebral
disc, 7 CSF, 8 bowel gas, 9 sclerotic lesion, 10 lytic lesion, 11 soft tissue (visceral/other).
Bone is :data:`BONE_LABELS` = (4, 5, 9, 10).

The table
---------
Each tissue has a relative proton density ``pd`` (water = 1), the longitudinal relaxation time
``t1_ms`` and the effective transverse relaxation time ``t2star_ms`` of its *water* component at
1.5 T and 3 T, a fat fraction ``fat_fraction`` (proton-density fat fraction; the fat component
uses :data:`FAT_T1_MS` / :data:`FAT_T2STAR_MS` and the multi-peak spectrum :data:`FAT_PEAKS`),
and a CT number ``hu_mean`` with a spatial spread ``hu_sd`` (standard deviation of a smooth
texture, not scanner noise). Values are rounded consensus values from:

- Stanisz GJ et al. *T1, T2 relaxation and magnetization transfer in tissue at 3T.* Magn Reson
  Med 2005;54:507-512 (muscle, cartilage/disc-like tissue, at 1.5 T and 3 T).
- Gold GE et al. *Musculoskeletal MRI at 3.0 T: relaxation times and image contrast.* AJR 2004;
  183:343-351 (muscle, subcutaneous fat, marrow at 1.5 T and 3 T).
- Chavhan GB et al. *Principles, techniques, and applications of T2*-based MR imaging.*
  RadioGraphics 2009;29:1433-1449 (T2* of muscle, fat, trabecular bone marrow).
- Du J, Bydder GM. *Qualitative and quantitative ultrashort-TE MRI of cortical bone.* NMR Biomed
  2013;26:489-506 (cortical bone: T2* about 0.3-0.5 ms, low visible proton density).
- Hamilton G et al. *In vivo characterization of the liver fat 1H MR spectrum.* NMR Biomed 2011;
  24:784-790 (six-peak fat spectrum).
- Schneider W, Bortfeld T, Schlegel W. *Correlation between CT numbers and tissue parameters
  needed for Monte Carlo simulations of clinical dose distributions.* Phys Med Biol 2000;45:459-478,
  and the Hounsfield scale (water 0, air -1000): HU of fat, muscle, soft tissue, cortical and
  trabecular bone.
- CSF T1 about 4 s (Lu H et al., JMRI 2005;22:13-22); disc nucleus T1/T2 from Stanisz-type
  cartilage values and lumbar disc relaxometry (e.g. Marinelli NL et al., Spine 2009).

Where a value is not measured directly (skin, bowel gas, lesions) it is a plausible estimate,
marked "estimate" below. The phantom is for testing and training, not for quantitative work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

from SyntheticCTLib.kernel.errors import InvalidParameterError

AIR = 0
SKIN = 1
SUBCUTANEOUS_FAT = 2
MUSCLE = 3
CORTICAL_BONE = 4
TRABECULAR_BONE = 5
DISC = 6
CSF = 7
BOWEL_GAS = 8
SCLEROTIC_LESION = 9
LYTIC_LESION = 10
SOFT_TISSUE = 11

TISSUES: Dict[int, str] = {
    AIR: "air",
    SKIN: "skin",
    SUBCUTANEOUS_FAT: "subcutaneous fat",
    MUSCLE: "muscle",
    CORTICAL_BONE: "cortical bone",
    TRABECULAR_BONE: "trabecular bone",
    DISC: "intervertebral disc",
    CSF: "CSF",
    BOWEL_GAS: "bowel gas",
    SCLEROTIC_LESION: "sclerotic lesion",
    LYTIC_LESION: "lytic lesion",
    SOFT_TISSUE: "soft tissue",
}
"""Label value -> tissue name."""

BONE_LABELS: Tuple[int, ...] = (CORTICAL_BONE, TRABECULAR_BONE, SCLEROTIC_LESION, LYTIC_LESION)
"""Label values that count as bone (``Phantom.bone_mask``, ``bone_labels``)."""

FIELD_STRENGTHS: Tuple[float, ...] = (1.5, 3.0)
"""Supported main-field strengths in tesla."""

GYROMAGNETIC_MHZ_PER_T = 42.577
"""Proton gyromagnetic ratio over 2 pi."""

FAT_PEAKS: Tuple[Tuple[float, float], ...] = (
    # (chemical shift relative to water in ppm, relative amplitude); Hamilton 2011, six peaks.
    (-3.80, 0.087),
    (-3.40, 0.693),
    (-2.60, 0.128),
    (-1.94, 0.004),
    (-0.39, 0.039),
    (0.60, 0.048),
)

FAT_T1_MS: Dict[float, float] = {1.5: 290.0, 3.0: 370.0}
"""T1 of the fat component (Gold 2004: subcutaneous fat 288 ms at 1.5 T, 371 ms at 3 T)."""

FAT_T2STAR_MS: Dict[float, float] = {1.5: 60.0, 3.0: 40.0}
"""T2* of the fat component in homogeneous fat (Chavhan 2009, rounded)."""


@dataclass(frozen=True)
class TissueProperties:
    """One row of the tissue table; relaxation times per field strength in tesla."""

    label: int
    name: str
    pd: float
    t1_ms: Dict[float, float]
    t2star_ms: Dict[float, float]
    fat_fraction: float
    hu_mean: float
    hu_sd: float
    source: str


def _row(
    label: int,
    pd: float,
    t1: Tuple[float, float],
    t2s: Tuple[float, float],
    ff: float,
    hu: float,
    hu_sd: float,
    source: str,
) -> TissueProperties:
    return TissueProperties(
        label, TISSUES[label], pd, {1.5: t1[0], 3.0: t1[1]}, {1.5: t2s[0], 3.0: t2s[1]}, ff, hu, hu_sd, source
    )


TISSUE_TABLE: Dict[int, TissueProperties] = {
    row.label: row
    for row in (
        #    label             PD    T1 1.5/3 T (ms)  T2* 1.5/3 T (ms)  FF    HU      HU sd  source
        _row(AIR, 0.0, (1.0, 1.0), (1.0, 1.0), 0.0, -1000.0, 0.0, "Hounsfield scale definition"),
        _row(SKIN, 0.70, (800.0, 1000.0), (25.0, 18.0), 0.10, 40.0, 10.0, "estimate (dermis)"),
        _row(
            SUBCUTANEOUS_FAT,
            0.95,
            (1000.0, 1200.0),
            (60.0, 40.0),
            0.90,
            -100.0,
            12.0,
            "Gold 2004 (T1 of the fat component); Schneider 2000 (adipose -120..-80 HU)",
        ),
        _row(
            MUSCLE,
            0.80,
            (1010.0, 1420.0),
            (30.0, 25.0),
            0.02,
            50.0,
            8.0,
            "Stanisz 2005 / Gold 2004 (T1); Chavhan 2009 (T2*); Schneider 2000 (muscle 40-60 HU)",
        ),
        _row(
            CORTICAL_BONE,
            0.05,
            (220.0, 250.0),
            (0.5, 0.4),
            0.0,
            1450.0,
            200.0,
            "Du & Bydder 2013 (UTE: T2* 0.3-0.5 ms); Schneider 2000 (cortical 1000-1900 HU)",
        ),
        _row(
            TRABECULAR_BONE,
            0.85,
            (800.0, 1000.0),
            (12.0, 8.0),
            0.45,
            260.0,
            70.0,
            "Gold 2004 (marrow); Chavhan 2009 (T2* of trabecular marrow); Schneider 2000 (150-400 HU)",
        ),
        _row(
            DISC,
            0.85,
            (1000.0, 1200.0),
            (40.0, 30.0),
            0.0,
            80.0,
            10.0,
            "Stanisz 2005 (cartilage-like), lumbar disc relaxometry; 70-100 HU",
        ),
        _row(CSF, 1.00, (4000.0, 4300.0), (200.0, 150.0), 0.0, 8.0, 4.0, "Lu 2005 (CSF T1); water-like HU"),
        _row(BOWEL_GAS, 0.0, (1.0, 1.0), (1.0, 1.0), 0.0, -950.0, 30.0, "estimate (gas with some content)"),
        _row(
            SCLEROTIC_LESION,
            0.30,
            (600.0, 700.0),
            (3.0, 2.0),
            0.0,
            900.0,
            150.0,
            "estimate (blastic metastasis / bone island: 600-1200 HU, dark on all sequences)",
        ),
        _row(
            LYTIC_LESION,
            0.85,
            (1100.0, 1400.0),
            (40.0, 30.0),
            0.0,
            45.0,
            12.0,
            "estimate (lytic metastasis: soft-tissue density, long T1)",
        ),
        _row(
            SOFT_TISSUE,
            0.80,
            (800.0, 1100.0),
            (30.0, 22.0),
            0.15,
            35.0,
            10.0,
            "Stanisz 2005 (liver/kidney-like viscera, rounded); Schneider 2000 (soft tissue 20-60 HU)",
        ),
    )
}
"""Label value -> :class:`TissueProperties`. The water component of each tissue; see the module docs."""

HU_RANGES: Dict[int, Tuple[float, float]] = {
    AIR: (-1000.0, -1000.0),
    SKIN: (0.0, 80.0),
    SUBCUTANEOUS_FAT: (-150.0, -50.0),
    MUSCLE: (20.0, 80.0),
    CORTICAL_BONE: (1000.0, 1900.0),
    TRABECULAR_BONE: (150.0, 400.0),
    DISC: (50.0, 110.0),
    CSF: (-10.0, 25.0),
    BOWEL_GAS: (-1000.0, -850.0),
    SCLEROTIC_LESION: (600.0, 1200.0),
    LYTIC_LESION: (10.0, 80.0),
    SOFT_TISSUE: (-60.0, 70.0),
}
"""The range of noise-free, pure-tissue CT numbers that the phantom produces for each tissue."""


def check_field_strength(field_strength: float) -> float:
    """Return the supported field strength nearest ``field_strength``; raise for any other value."""
    try:
        value = float(field_strength)
    except (TypeError, ValueError):
        raise InvalidParameterError(
            f"Unknown field strength {field_strength!r}; use one of {', '.join(f'{f:g}' for f in FIELD_STRENGTHS)} T."
        ) from None
    for known in FIELD_STRENGTHS:
        if abs(value - known) < 1e-6:
            return known
    raise InvalidParameterError(
        f"Unknown field strength {field_strength!r} T; use one of {', '.join(f'{f:g}' for f in FIELD_STRENGTHS)} T."
    )


def tissue_table_dict(field_strength: float) -> Dict[str, dict]:
    """The table at one field strength as plain JSON-ready data (for the case manifest)."""
    b0 = check_field_strength(field_strength)
    return {
        str(label): {
            "name": row.name,
            "pd": row.pd,
            "t1_ms": row.t1_ms[b0],
            "t2star_ms": row.t2star_ms[b0],
            "fat_fraction": row.fat_fraction,
            "hu_mean": row.hu_mean,
            "hu_sd": row.hu_sd,
        }
        for label, row in TISSUE_TABLE.items()
    }
