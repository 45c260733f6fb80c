"""The engine never imports Qt: every emu module, imported in a fresh interpreter, leaves no
PySide6, shiboken6 or pyqtgraph module loaded. So do the window's Qt-free parts."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QT = ("PySide6", "shiboken6", "pyqtgraph")
# What the window keeps apart from its widgets (gui/*.py without Qt), as napari keeps its
# models apart from _qt.
GUI_QT_FREE = ("gui.session", "gui.pagemap", "gui.synthetic", "gui.record", "gui.replay",
               "gui.compare", "gui.colourblind")

PROBE = """
import importlib, json, pkgutil, sys
sys.path.insert(0, sys.argv[1])
package = importlib.import_module(sys.argv[2])
names = [sys.argv[2]]
if hasattr(package, "__path__"):  # a package: every module in it, new ones included
    names += [m.name for m in pkgutil.walk_packages(package.__path__, sys.argv[2] + ".")]
for name in names:
    importlib.import_module(name)
qt = sorted(m for m in sys.modules if m.partition(".")[0] in sys.argv[3].split(","))
print(json.dumps({"file": package.__file__, "modules": names, "qt": qt}))
"""


def loaded(module: str) -> dict:
    """Import *module* (a package: with every module in it) in a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", PROBE, str(ROOT), module, ",".join(QT)],
                         capture_output=True, text=True, timeout=60, cwd=ROOT, check=True)
    return json.loads(out.stdout)


def test_no_emu_module_imports_qt():
    result = loaded("emu")
    assert Path(result["file"]).is_relative_to(ROOT)  # this checkout, not an installed copy
    assert {"emu.migration.source", "emu.migration.destination", "emu.net.link",
            "emu.cli"} <= set(result["modules"])
    assert result["qt"] == []


def test_the_windows_models_import_no_qt():
    for module in GUI_QT_FREE:
        assert loaded(module)["qt"] == [], module


def test_the_probe_sees_qt_where_there_is_some():
    qt = loaded("gui._qt.window")["qt"]
    assert {"PySide6", "shiboken6", "pyqtgraph"} <= set(qt)
