"""A screenshot as a red-green colour-blind student sees it (Machado et al. 2009, dichromacy).

    python tools/colourblind.py shot.png          # shot-deuteranopia.png, shot-protanopia.png
    python tools/colourblind.py shot.png --pairs  # and the palette's distances

The simulation itself is gui/colourblind.py (numpy, no Qt); Qt only reads and writes the PNGs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from emu.migration import ram as R  # noqa: E402
from gui import colourblind, pagemap  # noqa: E402


def load(path: Path, scale: float = 1.0) -> np.ndarray:
    from PySide6 import QtCore, QtGui

    image = QtGui.QImage(str(path))
    if image.isNull():
        raise SystemExit(f"{path}: not an image")
    if scale != 1.0:
        image = image.scaledToWidth(round(image.width() * scale),
                                    QtCore.Qt.TransformationMode.SmoothTransformation)
    image = image.convertToFormat(QtGui.QImage.Format.Format_RGB888)
    rows, cols, stride = image.height(), image.width(), image.bytesPerLine()
    data = np.frombuffer(image.constBits(), np.uint8, rows * stride).reshape(rows, stride)
    return data[:, :cols * 3].reshape(rows, cols, 3).copy()


def save(rgb: np.ndarray, path: Path) -> None:
    from PySide6 import QtGui

    rows, cols = rgb.shape[:2]
    rgb = np.ascontiguousarray(rgb)
    image = QtGui.QImage(rgb.data, cols, rows, cols * 3, QtGui.QImage.Format.Format_RGB888)
    if not image.save(str(path), "PNG"):
        raise SystemExit(f"could not write {path}")


# The pairs a student must tell apart, by display code: what came on demand on each channel,
# what is in flight on each, and each of those against the bulk stream and a waiting request.
PAIRS = ((R.URGENT_MAIN, R.URGENT_PREEMPT), (R.INFLIGHT_MAIN, R.INFLIGHT_PREEMPT),
         (R.URGENT_MAIN, R.BACKGROUND), (R.URGENT_PREEMPT, R.BACKGROUND),
         (R.URGENT_MAIN, R.REQUESTED), (R.URGENT_PREEMPT, R.REQUESTED))


def pair_table() -> str:
    lines = [f"{'pair':<52}{'normal':>8}{'deuter.':>8}{'protan.':>8}   (CIE76 Delta E)"]
    for a, b in PAIRS:
        name = f"{pagemap.LEGEND[a]} / {pagemap.LEGEND[b]}"
        d = [colourblind.delta_e(pagemap.COLOURS[a], pagemap.COLOURS[b], kind)
             for kind in (None, "deuteranopia", "protanopia")]
        lines.append(f"{name:<52}" + "".join(f"{x:8.0f}" for x in d))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("png", type=Path)
    parser.add_argument("--pairs", action="store_true", help="print the palette's distances")
    parser.add_argument("--scale", type=float, default=1.0, help="shrink first (0.5: half)")
    parser.add_argument("--out", type=Path, help="directory to write to (default: beside)")
    args = parser.parse_args()
    rgb = load(args.png, args.scale)
    for kind in colourblind.MACHADO:
        out = (args.out or args.png.parent) / f"{args.png.stem}-{kind}.png"
        save(colourblind.simulate(rgb, kind), out)
        print(f"wrote {out}")
    if args.pairs:
        print(pair_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
