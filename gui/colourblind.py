"""How the window's colours look to a red-green colour-blind student, without Qt.

Machado, Oliveira and Fernandes (2009), "A Physiologically-based Model for Simulation of Color
Vision Deficiency", severity 1.0 (dichromacy): a 3x3 matrix per deficiency, applied to linear
RGB. Distances are CIE76 Delta E in CIELAB (D65): about 2 is the smallest difference people
see, 10 or more reads as a different colour at a glance.
"""

from __future__ import annotations

import numpy as np

MACHADO = {
    "protanopia": np.array([[0.152286, 1.052583, -0.204868],
                            [0.114503, 0.786281, 0.099216],
                            [-0.003882, -0.048116, 1.051998]]),
    "deuteranopia": np.array([[0.367322, 0.860646, -0.227968],
                              [0.280085, 0.672501, 0.047413],
                              [-0.011820, 0.042940, 0.968881]]),
}
_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],  # linear sRGB -> XYZ (D65)
                 [0.2126729, 0.7151522, 0.0721750],
                 [0.0193339, 0.1191920, 0.9503041]])
_WHITE = np.array([0.95047, 1.0, 1.08883])


def _linear(rgb: np.ndarray) -> np.ndarray:
    c = np.asarray(rgb, np.float64) / 255.0
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def _encoded(lin: np.ndarray) -> np.ndarray:
    lin = np.clip(lin, 0.0, 1.0)
    c = np.where(lin <= 0.0031308, lin * 12.92, 1.055 * lin ** (1 / 2.4) - 0.055)
    return np.rint(c * 255).astype(np.uint8)


def simulate(rgb: np.ndarray, kind: str) -> np.ndarray:
    """sRGB colours (..., 3), 0-255, as a dichromat of *kind* sees them (uint8, same shape)."""
    return _encoded(_linear(rgb) @ MACHADO[kind].T)


def lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (..., 3), 0-255 -> CIELAB (..., 3)."""
    xyz = _linear(rgb) @ _XYZ.T / _WHITE
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]),
                     200 * (f[..., 1] - f[..., 2])], axis=-1)


def delta_e(a, b, kind: str | None = None) -> float:
    """CIE76 distance between colours a and b, as seen with *kind* (None: normal vision)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if kind is not None:
        a, b = simulate(a, kind), simulate(b, kind)
    return float(np.linalg.norm(lab(a) - lab(b)))
