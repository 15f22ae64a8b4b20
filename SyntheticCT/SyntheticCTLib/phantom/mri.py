"""MRI simulation: spoiled gradient-echo signal with multi-peak fat, coil bias field and Rician noise.

The steady-state signal of a 3D spoiled gradient echo at echo time TE is

    S = PD * sin(a) (1 - E1) / (1 - cos(a) E1) * exp(-TE / T2*),   E1 = exp(-TR / T1)

for each chemical species. A tissue with proton-density fat fraction ``ff`` sums a water part and a
fat part whose six spectral peaks (:data:`~.tissues.FAT_PEAKS`) precess at their own frequencies,
so that fat and water go in and out of phase from echo to echo.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from SyntheticCTLib.phantom.tissues import FAT_PEAKS, FAT_T1_MS, FAT_T2STAR_MS, GYROMAGNETIC_MHZ_PER_T, TISSUE_TABLE

C64 = np.complex64
F32 = np.float32

DEFAULT_PROTOCOLS: Dict[float, dict] = {
    # 3D multi-echo spoiled GRE: first echo near in phase, second near opposed phase, third in phase at 3 T;
    # opposed, in, opposed phase at 1.5 T. TR and flip angle give T1 weighting (fat bright, CSF dark).
    1.5: {"echo_times_ms": [2.3, 4.6, 6.9], "tr_ms": 12.0, "flip_angle_deg": 15.0},
    3.0: {"echo_times_ms": [2.2, 3.4, 4.6], "tr_ms": 10.0, "flip_angle_deg": 15.0},
}
"""Default acquisition per field strength (tesla)."""


def spgr_magnitude(pd: float, t1_ms: float, tr_ms: float, flip_deg: float) -> float:
    """Steady-state spoiled gradient-echo amplitude at TE = 0."""
    a = np.deg2rad(flip_deg)
    e1 = np.exp(-tr_ms / t1_ms)
    return float(pd * np.sin(a) * (1 - e1) / (1 - np.cos(a) * e1))


def fat_phasor(te_ms: float, field_strength: float) -> complex:
    """Complex sum of the fat peaks' amplitudes at ``te_ms`` (1 at TE = 0)."""
    hz_per_ppm = GYROMAGNETIC_MHZ_PER_T * field_strength
    return complex(sum(amp * np.exp(2j * np.pi * ppm * hz_per_ppm * te_ms * 1e-3) for ppm, amp in FAT_PEAKS))


class TissueSignals:
    """Noise-free complex signals of every tissue's water and fat parts at each echo."""

    def __init__(
        self, field_strength: float, echo_times_ms: Sequence[float], tr_ms: float, flip_angle_deg: float
    ) -> None:
        self.field_strength = field_strength
        self.echo_times_ms = [float(t) for t in echo_times_ms]
        self.tr_ms = float(tr_ms)
        self.flip_angle_deg = float(flip_angle_deg)
        b0 = field_strength
        fat_t1 = FAT_T1_MS[b0]
        self._water: Dict[int, np.ndarray] = {}
        self._fat: Dict[int, np.ndarray] = {}
        for label, row in TISSUE_TABLE.items():
            t2w = row.t2star_ms[b0]
            t2f = min(FAT_T2STAR_MS[b0], t2w)
            sw = spgr_magnitude(row.pd, row.t1_ms[b0], tr_ms, flip_angle_deg)
            sf = spgr_magnitude(row.pd, fat_t1, tr_ms, flip_angle_deg)
            self._water[label] = np.array([sw * np.exp(-te / t2w) for te in self.echo_times_ms], dtype=C64)
            self._fat[label] = np.array(
                [sf * np.exp(-te / t2f) * fat_phasor(te, b0) for te in self.echo_times_ms], dtype=C64
            )

    @property
    def n_echoes(self) -> int:
        return len(self.echo_times_ms)

    def signal(
        self, label: int, fat_fraction: Union[None, float, np.ndarray] = None, pd_scale: Union[float, np.ndarray] = 1.0
    ) -> List[Union[complex, np.ndarray]]:
        """Per-echo complex signal of tissue ``label``: a scalar, or an array where ``fat_fraction``/``pd_scale`` are.

        ``fat_fraction`` defaults to the table's value for the tissue.
        """
        ff = TISSUE_TABLE[label].fat_fraction if fat_fraction is None else fat_fraction
        out: List[Union[complex, np.ndarray]] = []
        for e in range(self.n_echoes):
            w, f = self._water[label][e], self._fat[label][e]
            if isinstance(ff, np.ndarray) or isinstance(pd_scale, np.ndarray):
                s = (ff * (f - w) + w).astype(C64, copy=False)
                if isinstance(pd_scale, np.ndarray) or pd_scale != 1.0:
                    s = s * pd_scale
                out.append(s.astype(C64, copy=False))
            else:
                out.append(C64((w + ff * (f - w)) * pd_scale))
        return out


def bias_field(axes: Sequence[np.ndarray], coefficients: np.ndarray, fov_mm: Sequence[float]) -> np.ndarray:
    """Smooth multiplicative coil bias: ``exp`` of a quadratic polynomial in normalized world coordinates.

    ``coefficients`` holds the 9 non-constant terms (x, y, z, xx, yy, zz, xy, xz, yz); returns a
    float32 (z, y, x) array whose geometric mean is near 1.
    """
    x = (axes[0] / (fov_mm[0] / 2)).astype(F32)[None, None, :]
    y = (axes[1] / (fov_mm[1] / 2)).astype(F32)[None, :, None]
    z = (axes[2] / (fov_mm[2] / 2)).astype(F32)[:, None, None]
    c = [F32(v) for v in coefficients]
    # Separable parts first (cheap), then the cross terms.
    log_b = (c[0] * x + c[3] * (x * x)) + (c[1] * y + c[4] * (y * y)) + (c[2] * z + c[5] * (z * z))
    log_b = log_b + c[6] * (x * y) + c[7] * (x * z) + c[8] * (y * z)
    np.exp(log_b, out=log_b)
    return log_b


def rician_magnitude(signal: np.ndarray, sigma: float, rng: Optional[np.random.Generator]) -> np.ndarray:
    """Magnitude of a complex signal plus complex Gaussian noise of standard deviation ``sigma`` per channel."""
    if rng is None or sigma <= 0:
        return np.abs(signal).astype(F32)
    re = signal.real + rng.standard_normal(signal.shape, dtype=F32) * F32(sigma)
    im = signal.imag + rng.standard_normal(signal.shape, dtype=F32) * F32(sigma)
    return np.sqrt(re * re + im * im).astype(F32, copy=False)
