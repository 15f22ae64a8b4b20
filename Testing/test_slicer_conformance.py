"""Static checks of the Slicer layer, which no test here can run.

The module files are parsed (``ast``) and the ``.ui`` files read (XML); every name they use from
Slicer is looked up in ``../shared/slicer/slicer_api.json``, the real API read from the Slicer
source. The test fails on:

- a ``slicer.util.*`` name (or a keyword argument it does not take), a ``slicer.vtkMRML*`` class or
  class attribute, a ``slicer.modules.*`` module or logic method, a ``sitkUtils.*`` or a
  ``slicer.packaging.*`` name absent from the API file; a node class in a string
  (``AddNewNodeByClass("vtkMRML...")``, ``nodeTypes``) or a color node ID that does not exist; a
  method called on a node created with ``AddNewNodeByClass`` that its class does not have;
- a ``slicer.util`` function or keyword newer than Slicer 5.8 used without a feature check;
- a widget class (``.ui`` or ``ctk.``/``slicer.q*`` in Python) absent from the widget lists;
- a ``self.ui.<name>`` that no widget or layout in the ``.ui`` has;
- a ``SlicerParameterName`` that matches no ``@parameterNodeWrapper`` field, or whose widget cannot
  show the field's type (the GUI connectors of Slicer 5.8);
- a file in a module folder that the module's ``CMakeLists.txt`` does not list (run
  ``python Testing/cmake_file_lists.py`` to regenerate the lists);
- syntax that Python 3.9 rejects, in the module files and their ``<M>Lib`` packages, and ``X | Y``
  annotations that Python 3.9 would evaluate at run time.

The test is skipped, with a message, where ``slicer_api.json`` is absent.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from functools import cache, lru_cache
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set, Tuple

import pytest

REPO = Path(__file__).resolve().parents[1]
API_PATH = REPO.parent / "shared" / "slicer" / "slicer_api.json"
MODULES = ("SyntheticCT", "SyntheticCTRegistration")
OLDEST_SLICER = (5, 8)

# Supplements to slicer_api.json, each verified by reading the Slicer source at the tags v5.8.0 and
# v5.12.0 and at commit 583e9b3 (the API file's source); the header named is where it is declared.
VERIFIED_MODULE_LOGIC: Dict[str, Dict[str, object]] = {
    # Modules/Loadable/Colors/Logic/vtkSlicerColorLogic.h (static methods; CONVENTIONS.md names the first)
    "colors": {"AddDefaultColorLegendDisplayNode", "GetColorLegendDisplayNode"},
    # Modules/Loadable/VolumeRendering/Logic/vtkSlicerVolumeRenderingLogic.h
    "volumerendering": {
        "CreateDefaultVolumeRenderingNodes",
        "GetPresetByName",
        "GetFirstVolumeRenderingDisplayNode",
        "CopyDisplayToVolumeRenderingDisplayNode",
    },
}
# Libs/MRML/... / Modules/Loadable/Markups/MRML/vtkMRMLMarkupsNode.h: event ids (enum members, not methods).
VERIFIED_CLASS_CONSTANTS: Dict[str, Set[str]] = {
    # Libs/MRML/Core/vtkMRMLScene.h: scene events.
    "vtkMRMLScene": {
        "StartCloseEvent",
        "EndCloseEvent",
        "NodeAddedEvent",
        "NodeRemovedEvent",
        "EndImportEvent",
        "StartImportEvent",
    },
    "vtkMRMLMarkupsNode": {"PointPositionDefinedEvent", "PointModifiedEvent", "PointEndInteractionEvent"},
    "vtkMRMLMarkupsFiducialNode": {"PointPositionDefinedEvent", "PointModifiedEvent", "PointEndInteractionEvent"},
    "vtkMRMLMarkupsLineNode": {"PointPositionDefinedEvent", "PointModifiedEvent", "PointEndInteractionEvent"},
}
# Methods every VTK object has (the API file leaves vtkObject's out, see its mrml_methods_note).
VTK_OBJECT_METHODS = {
    "AddObserver",
    "RemoveObserver",
    "Modified",
    "GetClassName",
    "IsA",
    "GetMTime",
    "InvokeEvent",
    "HasObserver",
    "RemoveObservers",
    "SafeDownCast",
}
# Module name -> logic class in the API file's logic_and_core_methods.
MODULE_LOGIC_CLASSES = {
    "volumes": "vtkSlicerVolumesLogic",
    "models": "vtkSlicerModelsLogic",
    "transforms": "vtkSlicerTransformLogic",
    "segmentations": "vtkSlicerSegmentationsModuleLogic",
}
# slicer.util keywords that exist only from Slicer 5.12 (slicer.util_since_note).
NEW_KEYWORDS = {("launchConsoleProcess", k) for k in ("blocking", "logCallback", "completedCallback")} | {
    ("logProcessOutput", "logCallback")
}
FEATURE_CHECK = re.compile(r"hasattr|signature|getattr|Supports|supports|version", re.I)

# Standard Qt classes (Qt 5 QtCore/QtGui/QtWidgets) that the modules may name; Designer's "Line" too.
QT_WIDGETS = {
    "QWidget",
    "QFrame",
    "QLabel",
    "QPushButton",
    "QToolButton",
    "QRadioButton",
    "QCheckBox",
    "QComboBox",
    "QSpinBox",
    "QDoubleSpinBox",
    "QLineEdit",
    "QTextEdit",
    "QPlainTextEdit",
    "QTextBrowser",
    "QProgressBar",
    "QGroupBox",
    "QSlider",
    "QScrollArea",
    "QTabWidget",
    "QStackedWidget",
    "QSplitter",
    "QTableWidget",
    "QListWidget",
    "QTreeWidget",
    "QTableView",
    "QListView",
    "QTreeView",
    "QDialogButtonBox",
    "QScrollBar",
    "QDial",
    "QLCDNumber",
    "QDateEdit",
    "QTimeEdit",
    "QDateTimeEdit",
    "QFontComboBox",
    "QCommandLinkButton",
    "QToolBox",
    "QMdiArea",
    "QDockWidget",
    "QMainWindow",
    "QDialog",
    "QMenu",
    "QMenuBar",
    "QToolBar",
    "QStatusBar",
    "Line",
}
QT_OTHER = {
    "QTimer",
    "QSettings",
    "QUrl",
    "QDesktopServices",
    "QFileDialog",
    "QMessageBox",
    "QInputDialog",
    "QApplication",
    "QColor",
    "QIcon",
    "QPixmap",
    "QSize",
    "QFont",
    "QVBoxLayout",
    "QHBoxLayout",
    "QFormLayout",
    "QGridLayout",
    "QSpacerItem",
    "QSizePolicy",
    "QCursor",
    "QDir",
    "QFileInfo",
    "QObject",
    "QEvent",
    "QPalette",
    "QKeySequence",
    "QShortcut",
    "QAction",
    "QStandardItemModel",
    "QStandardItem",
    "QProcess",
    "QDateTime",
    "QLocale",
    "QElapsedTimer",
    "QThread",
    "QEventLoop",
    "QPoint",
    "QRect",
    "QImage",
    "QBrush",
    "QPen",
    "Qt",
}
LAYOUT_CLASSES = {"QVBoxLayout", "QHBoxLayout", "QFormLayout", "QGridLayout", "QStackedLayout"}

# Widget classes each parameter type can be bound to (Base/Python/slicer/parameterNodeWrapper/guiConnectors.py,
# Slicer 5.8). "str" in a combo box needs a Choice annotation, checked below.
CONNECTORS = {
    "bool": {"QCheckBox", "ctkCheckBox", "QPushButton", "ctkCheckablePushButton"},
    "int": {"QSlider", "QSpinBox", "QComboBox", "ctkComboBox"},
    "float": {
        "QDoubleSpinBox",
        "ctkSliderWidget",
        "qMRMLSliderWidget",
        "ctkDoubleSlider",
        "ctkDoubleSpinBox",
        "qMRMLSpinBox",
        "QComboBox",
        "ctkComboBox",
    },
    "str": {"QLineEdit", "QLabel", "QTextEdit", "QComboBox", "ctkComboBox"},
    "enum": {"QComboBox", "ctkComboBox"},
    "FloatRange": {"ctkRangeWidget", "ctkDoubleRangeSlider", "qMRMLRangeWidget"},
    "path": {"ctkPathLineEdit", "ctkDirectoryButton"},
    "node": {"qMRMLNodeComboBox"},
    "QColor": {"ctkColorPickerButton"},
}


@lru_cache(maxsize=1)
def _api() -> dict:
    if not API_PATH.exists():
        pytest.skip(
            f"The Slicer API file {API_PATH} is absent (it lives in ../shared/slicer beside the repository); "
            "the static Slicer checks need it."
        )
    return json.loads(API_PATH.read_text(encoding="utf-8"))


def _cmake_lists():
    spec = importlib.util.spec_from_file_location("cmake_file_lists", REPO / "Testing" / "cmake_file_lists.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def _module_file(name: str) -> Path:
    return REPO / name / f"{name}.py"


def _ui_files(name: str) -> List[Path]:
    return sorted((REPO / name / "Resources" / "UI").glob("*.ui"))


def _lib_files(name: str) -> List[Path]:
    return sorted(p for p in (REPO / name / f"{name}Lib").rglob("*.py") if "__pycache__" not in p.parts)


@cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _dotted(node: ast.AST) -> Optional[str]:
    """``a.b.c`` for an attribute chain on a name, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _parents(tree: ast.AST) -> Dict[ast.AST, ast.AST]:
    parents = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    return parents


def _guarded(node: ast.AST, parents: Dict[ast.AST, ast.AST], source: str) -> bool:
    """True when ``node`` sits under an ``if`` (or conditional expression) whose test looks like a feature check."""
    while node in parents:
        node = parents[node]
        if isinstance(node, (ast.If, ast.IfExp)) and FEATURE_CHECK.search(
            ast.get_source_segment(source, node.test) or ""
        ):
            return True
    return False


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return path.name


def _where(path: Path, node: ast.AST) -> str:
    return f"{_rel(path)}:{getattr(node, 'lineno', '?')}"


def _signature_params(signature: str) -> Tuple[Set[str], bool]:
    """Parameter names of a signature string like ``f(a, b=1, **kwargs)``, and whether it takes ``**kwargs``."""
    text = signature[signature.index("(") :]
    try:
        fn = ast.parse(f"def f{text}: pass").body[0]
    except SyntaxError:
        names = set(re.findall(r"(\w+)\s*[=:,)]", text))
        return names, "**" in text
    assert isinstance(fn, ast.FunctionDef)
    args = fn.args
    names = {a.arg for a in args.posonlyargs + args.args + args.kwonlyargs}
    return names, args.kwarg is not None


def _util_since(name: str) -> Optional[Tuple[int, int]]:
    tag = _api()["slicer.util_since"].get(name)
    if not tag:
        return None
    m = re.match(r"v(\d+)\.(\d+)", tag)
    return (int(m.group(1)), int(m.group(2))) if m else None


# ------------------------------------------------------------------------------------------------
# the .ui side
# ------------------------------------------------------------------------------------------------


def _ui_widgets(path: Path) -> Dict[str, Tuple[str, ET.Element]]:
    """name -> (class, element) of every widget and layout in a .ui file."""
    root = ET.parse(path).getroot()
    found = {}
    for el in root.iter():
        if el.tag in ("widget", "layout") and el.get("name"):
            found[el.get("name")] = (el.get("class"), el)
    return found


def _prop(el: ET.Element, name: str) -> Optional[ET.Element]:
    for p in el.findall("property"):
        if p.get("name") == name:
            return p
    return None


def _known_widget_classes() -> Set[str]:
    api = _api()
    known = set(api["qt_widget_classes"]) | set(api["qt_widget_api"])
    for values in api["qt_widget_classes_detail"].values():
        known |= set(values)
    return known | QT_WIDGETS


# ------------------------------------------------------------------------------------------------
# collecting findings
# ------------------------------------------------------------------------------------------------


def _slicer_name_problems(path: Path) -> Iterator[str]:
    """Problems with slicer.util / vtkMRML / modules / sitkUtils / packaging / widget names in one file."""
    api = _api()
    source = path.read_text(encoding="utf-8")
    tree = _tree(path)
    parents = _parents(tree)
    util = set(api["slicer.util"]) | set(api["slicer.util_classes"])
    util_sigs = api["slicer.util_signatures"]
    mrml = set(api["mrml_classes"]) | set(api["mrml_classes_other_locations"])
    methods = api["mrml_methods"]
    sitk_utils = set(api["sitkUtils"])
    packaging = set(api["slicer.packaging"])
    packaging_sigs = {s.split("(")[0]: s for s in api["slicer.packaging_signatures"]}
    colors = set(api["color_node_ids"])
    widgets = _known_widget_classes()
    own_modules = {m.lower() for m in MODULES}
    cli_modules = {m.split(" ")[0].lower() for m in api["cli_modules_in_core"]}
    module_names = set(MODULE_LOGIC_CLASSES) | set(VERIFIED_MODULE_LOGIC) | cli_modules | own_modules | {"markups"}

    for node in ast.walk(tree):
        # imports: from slicer.util import X, from slicer import vtkMRMLX, import sitkUtils
        if isinstance(node, ast.ImportFrom) and node.module in (
            "slicer.util",
            "slicer",
            "sitkUtils",
            "slicer.packaging",
        ):
            for alias in node.names:
                n = alias.name
                if node.module == "slicer.util" and n not in util:
                    yield f"{_where(path, node)}: slicer.util has no '{n}'"
                elif node.module == "slicer" and n.startswith("vtkMRML") and n not in mrml:
                    yield f"{_where(path, node)}: slicer has no MRML class '{n}'"
                elif node.module == "sitkUtils" and n not in sitk_utils:
                    yield f"{_where(path, node)}: sitkUtils has no '{n}'"
                elif node.module == "slicer.packaging" and n not in packaging:
                    yield f"{_where(path, node)}: slicer.packaging has no '{n}'"
        if isinstance(node, ast.Attribute):
            dotted = _dotted(node)
            if dotted:
                parts = dotted.split(".")
                if parts[:2] == ["slicer", "util"] and len(parts) >= 3 and parts[2] not in util:
                    yield f"{_where(path, node)}: slicer.util.{parts[2]} does not exist in Slicer"
                if parts[0] == "slicer" and len(parts) >= 2 and parts[1].startswith("vtkMRML"):
                    cls = parts[1]
                    if cls not in mrml:
                        yield f"{_where(path, node)}: slicer.{cls} is not an MRML class"
                    elif len(parts) >= 3 and cls in methods:
                        attr = parts[2]
                        allowed = set(methods[cls]) | VTK_OBJECT_METHODS | VERIFIED_CLASS_CONSTANTS.get(cls, set())
                        if cls == "vtkMRMLLayoutNode":
                            allowed |= set(api["layout_ids"])
                        if attr not in allowed:
                            yield f"{_where(path, node)}: slicer.{cls}.{attr} is not in the API of {cls}"
                if parts[:2] == ["slicer", "mrmlScene"] and len(parts) == 3:
                    allowed = (
                        set(methods["vtkMRMLScene"]) | VTK_OBJECT_METHODS | VERIFIED_CLASS_CONSTANTS["vtkMRMLScene"]
                    )
                    if parts[2] not in allowed:
                        yield f"{_where(path, node)}: slicer.mrmlScene.{parts[2]} is not in the API of vtkMRMLScene"
                if parts[0] == "sitkUtils" and len(parts) >= 2 and parts[1] not in sitk_utils:
                    yield f"{_where(path, node)}: sitkUtils.{parts[1]} does not exist"
                if parts[:2] == ["slicer", "packaging"] and len(parts) >= 3 and parts[2] not in packaging:
                    yield f"{_where(path, node)}: slicer.packaging.{parts[2]} does not exist"
                if parts[:2] == ["slicer", "modules"] and len(parts) >= 3 and len(parts) == 3:
                    if parts[2] not in module_names:
                        yield f"{_where(path, node)}: slicer.modules.{parts[2]} is not a known Slicer module"
                if parts[0] == "ctk" and len(parts) == 2 and parts[1].startswith("ctk") and parts[1] not in widgets:
                    yield f"{_where(path, node)}: ctk.{parts[1]} is not a known CTK widget class"
                if (
                    parts[0] == "slicer"
                    and len(parts) == 2
                    and re.match(r"q(MRML|Slicer)[A-Z]", parts[1])
                    and parts[1] not in widgets
                ):
                    yield f"{_where(path, node)}: slicer.{parts[1]} is not a known widget class"
                if parts[0] == "qt" and len(parts) == 2 and parts[1] not in QT_WIDGETS | QT_OTHER:
                    yield f"{_where(path, node)}: qt.{parts[1]} is not a Qt class this test knows"
        if isinstance(node, ast.Call):
            func = _dotted(node.func)
            # slicer.modules.X.logic().Method(...)
            if isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Call):
                inner = _dotted(node.func.value.func) or ""
                m = re.fullmatch(r"slicer\.modules\.(\w+)\.logic", inner)
                if m and node.func.attr not in (_logic_methods(m.group(1)) or set()):
                    yield (
                        f"{_where(path, node)}: slicer.modules.{m.group(1)}.logic().{node.func.attr} is not a known "
                        "logic method"
                    )
            if func and func.startswith("slicer.util.") and func.count(".") == 2:
                name = func.split(".")[2]
                if name in util_sigs:
                    params, any_kw = _signature_params(util_sigs[name])
                    for kw in node.keywords:
                        if kw.arg and not any_kw and kw.arg not in params:
                            yield f"{_where(path, node)}: slicer.util.{name} takes no keyword '{kw.arg}'"
                        if kw.arg and (name, kw.arg) in NEW_KEYWORDS and not _guarded(node, parents, source):
                            yield (
                                f"{_where(path, node)}: slicer.util.{name}({kw.arg}=...) exists only from Slicer "
                                "5.12; check for it first (e.g. inspect.signature)"
                            )
                since = _util_since(name)
                if since and since > OLDEST_SLICER and not _guarded(node, parents, source):
                    yield (
                        f"{_where(path, node)}: slicer.util.{name} exists only from Slicer {since[0]}.{since[1]}; "
                        "check hasattr(slicer.util, ...) first"
                    )
            if func and func.startswith("slicer.packaging.") and not _guarded(node, parents, source):
                yield f"{_where(path, node)}: slicer.packaging exists only from Slicer 5.12; check hasattr(slicer, 'packaging') first"
            if func and func.startswith("slicer.packaging.") and func.split(".")[2] in packaging_sigs:
                params, any_kw = _signature_params(packaging_sigs[func.split(".")[2]])
                for kw in node.keywords:
                    if kw.arg and not any_kw and kw.arg not in params:
                        yield f"{_where(path, node)}: {func} takes no keyword '{kw.arg}'"
        # strings naming MRML classes or color nodes
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
            if re.fullmatch(r"vtkMRML\w+", text) and not text.startswith("vtkMRMLColorTableNodeFile"):
                if text not in mrml and not text.startswith(("vtkMRMLColorTableNode", "vtkMRMLPETProceduralColorNode")):
                    yield f"{_where(path, node)}: '{text}' is not an MRML class"
            if text.startswith("vtkMRMLColorTableNodeFile") and text not in colors:
                yield f"{_where(path, node)}: '{text}' is not a color node ID"
    yield from _node_method_problems(path, tree)


def _logic_methods(module: str) -> Optional[Set[str]]:
    """Known methods of ``slicer.modules.<module>.logic()``, or None when the module's logic is not known."""
    logic = _api()["logic_and_core_methods"]
    if module in MODULE_LOGIC_CLASSES:
        return set(logic[MODULE_LOGIC_CLASSES[module]]["public"]) | VTK_OBJECT_METHODS
    if module in VERIFIED_MODULE_LOGIC:
        return set(VERIFIED_MODULE_LOGIC[module])  # type: ignore[arg-type]
    return None


def _node_method_problems(path: Path, tree: ast.Module) -> Iterator[str]:
    """Methods called on a variable holding a node made with AddNewNodeByClass("vtkMRMLX") (or found with
    GetFirstNodeByClass), or holding ``slicer.modules.<m>.logic()``, must exist there."""
    methods = _api()["mrml_methods"]
    for func in ast.walk(tree):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        known: Dict[str, Tuple[str, Set[str]]] = {}
        for node in ast.walk(func):
            if not (
                isinstance(node, ast.Assign)
                and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)
                and isinstance(node.value, ast.Call)
            ):
                continue
            callee = _dotted(node.value.func) or ""
            if callee.endswith(("AddNewNodeByClass", "GetFirstNodeByClass")) and node.value.args:
                arg = node.value.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value in methods:
                    known[node.targets[0].id] = (arg.value, set(methods[arg.value]) | VTK_OBJECT_METHODS)
            m = re.fullmatch(r"slicer\.modules\.(\w+)\.logic", callee)
            if m:
                allowed = _logic_methods(m.group(1))
                known[node.targets[0].id] = (f"slicer.modules.{m.group(1)}.logic()", allowed or set())
        for node in ast.walk(func):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
            ):
                what = known.get(node.func.value.id)
                if what and node.func.attr not in what[1]:
                    yield f"{_where(path, node)}: {what[0]} has no method {node.func.attr}"


def _ui_class_problems(path: Path) -> Iterator[str]:
    api = _api()
    known = _known_widget_classes()
    mrml = set(api["mrml_classes"]) | set(api["mrml_classes_other_locations"])
    root = ET.parse(path).getroot()
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    rel = path.relative_to(REPO)
    for el in root.iter("widget"):
        cls = el.get("class")
        if cls not in known:
            yield f"{rel}: widget '{el.get('name')}' has class {cls}, which is not in Slicer's widget lists"
        if cls not in QT_WIDGETS and cls not in declared:
            yield f"{rel}: widget class {cls} is used but not declared under <customwidgets>"
        node_types = _prop(el, "nodeTypes")
        if node_types is not None:
            for s in node_types.iter("string"):
                if s.text not in mrml:
                    yield f"{rel}: widget '{el.get('name')}' lists node type {s.text}, which is not an MRML class"
    for el in root.iter("layout"):
        if el.get("class") not in LAYOUT_CLASSES:
            yield f"{rel}: layout '{el.get('name')}' has unknown class {el.get('class')}"
    top = root.find("widget")
    if top is None or top.get("class") != "qMRMLWidget":
        yield f"{rel}: the top widget must be a qMRMLWidget"


# ------------------------------------------------------------------------------------------------
# parameter node wrappers
# ------------------------------------------------------------------------------------------------


def _annotation_kind(ann: ast.AST, enums: Set[str]) -> Tuple[str, Optional[str], bool]:
    """(kind, node class or None, has Choice) of a wrapper field annotation."""
    has_choice = False
    if isinstance(ann, ast.Subscript) and (_dotted(ann.value) or "").split(".")[-1] == "Annotated":
        elts = ann.slice.elts if isinstance(ann.slice, ast.Tuple) else [ann.slice]
        has_choice = any(isinstance(e, ast.Call) and (_dotted(e.func) or "").endswith("Choice") for e in elts[1:])
        ann = elts[0]
    if isinstance(ann, ast.Subscript) and (_dotted(ann.value) or "").split(".")[-1] in ("Optional", "Union"):
        elts = ann.slice.elts if isinstance(ann.slice, ast.Tuple) else [ann.slice]
        ann = elts[0]
    name = (_dotted(ann) or "").split(".")[-1]
    if name.startswith("vtkMRML"):
        return "node", name, has_choice
    if name in enums:
        return "enum", None, has_choice
    if name in ("Path", "PurePath", "PosixPath", "WindowsPath"):
        return "path", None, has_choice
    return name, None, has_choice


def _wrappers(path: Path) -> Dict[str, Dict[str, Tuple[str, Optional[str], bool]]]:
    """class name -> {field: (kind, node class, has Choice)} for each @parameterNodeWrapper class."""
    tree = _tree(path)
    enums = {
        c.name
        for c in ast.walk(tree)
        if isinstance(c, ast.ClassDef)
        and any((_dotted(b) or "").split(".")[-1] in ("Enum", "IntEnum") for b in c.bases)
    }
    found = {}
    for cls in ast.walk(tree):
        if isinstance(cls, ast.ClassDef) and any(
            (_dotted(d.func if isinstance(d, ast.Call) else d) or "").endswith("parameterNodeWrapper")
            for d in cls.decorator_list
        ):
            found[cls.name] = {
                stmt.target.id: _annotation_kind(stmt.annotation, enums)
                for stmt in cls.body
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
            }
    return found


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api():
    return _api()


@pytest.mark.parametrize("module", MODULES)
def test_module_files_exist(module):
    folder = REPO / module
    for rel in (f"{module}.py", "CMakeLists.txt", f"Resources/UI/{module}.ui", f"Resources/Icons/{module}.png"):
        assert (folder / rel).is_file(), f"{module}/{rel} is missing"
    png = (folder / "Resources" / "Icons" / f"{module}.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (128, 128), f"{module}.png is {width}x{height}; Slicer expects 128x128"


@pytest.mark.parametrize("module", MODULES)
def test_python39_syntax(module):
    """The module file and its Lib parse as Python 3.9; module files keep X | Y out of run-time annotations."""
    problems = []
    for path in [_module_file(module)] + _lib_files(module):
        source = path.read_text(encoding="utf-8")
        try:
            tree = ast.parse(source, filename=str(path), feature_version=(3, 9))
        except SyntaxError as e:
            problems.append(f"{path.relative_to(REPO)}:{e.lineno}: Python 3.9 rejects this: {e.msg}")
            continue
        future = any(
            isinstance(n, ast.ImportFrom) and n.module == "__future__" and any(a.name == "annotations" for a in n.names)
            for n in tree.body
        )
        wrapper_classes = set(_wrappers(path)) if path.name == f"{module}.py" else set()
        for node in ast.walk(tree):
            anns = []
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not future:
                anns += [a.annotation for a in node.args.args + node.args.kwonlyargs + node.args.posonlyargs]
                anns += [
                    node.args.vararg.annotation if node.args.vararg else None,
                    node.args.kwarg.annotation if node.args.kwarg else None,
                    node.returns,
                ]
            if isinstance(node, ast.ClassDef):
                runtime = node.name in wrapper_classes or not future  # the wrapper reads its annotations
                if runtime:
                    anns += [s.annotation for s in node.body if isinstance(s, ast.AnnAssign)]
            if isinstance(node, ast.Module) and not future:
                anns += [s.annotation for s in node.body if isinstance(s, ast.AnnAssign)]
            for ann in anns:
                if ann is not None and any(
                    isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr) for n in ast.walk(ann)
                ):
                    problems.append(
                        f"{path.relative_to(REPO)}:{ann.lineno}: 'X | Y' annotation is evaluated at run "
                        "time and fails on Python 3.9 (Slicer 5.8); use Optional[X] / Union[X, Y]"
                    )
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("module", MODULES)
def test_slicer_names_exist(api, module):
    problems = list(_slicer_name_problems(_module_file(module)))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("module", MODULES)
def test_ui_widget_classes_exist(api, module):
    ui_files = _ui_files(module)
    assert ui_files, f"{module} has no .ui file"
    problems = [p for ui in ui_files for p in _ui_class_problems(ui)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("module", MODULES)
def test_self_ui_names_are_in_the_ui_file(module):
    names: Set[str] = set()
    for ui in _ui_files(module):
        names |= set(_ui_widgets(ui))
    problems = []
    path = _module_file(module)
    for node in ast.walk(_tree(path)):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui"
            and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "self"
        ):
            if node.attr not in names:
                problems.append(f"{_where(path, node)}: self.ui.{node.attr} is not a widget of {module}.ui")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("module", MODULES)
def test_parameter_names_match_the_wrapper(module):
    path = _module_file(module)
    wrappers = _wrappers(path)
    assert wrappers, f"{module}.py has no @parameterNodeWrapper class"
    fields: Dict[str, Tuple[str, Optional[str], bool]] = {}
    for f in wrappers.values():
        fields.update(f)
    problems = []
    bound = set()
    for ui in _ui_files(module):
        for name, (cls, el) in _ui_widgets(ui).items():
            p = _prop(el, "SlicerParameterName")
            if p is None:
                continue
            param = p.findtext("string")
            bound.add(param)
            if param not in fields:
                problems.append(
                    f"{ui.relative_to(REPO)}: widget '{name}' has SlicerParameterName '{param}', "
                    f"which is not a field of {', '.join(wrappers)}"
                )
                continue
            kind, node_class, has_choice = fields[param]
            if kind not in CONNECTORS:
                problems.append(f"{ui.relative_to(REPO)}: parameter '{param}' has a type ({kind}) no widget can show")
            elif cls not in CONNECTORS[kind]:
                problems.append(
                    f"{ui.relative_to(REPO)}: widget '{name}' ({cls}) cannot show parameter '{param}' of "
                    f"type {kind}; use one of {sorted(CONNECTORS[kind])}"
                )
            elif kind == "str" and cls in ("QComboBox", "ctkComboBox") and not has_choice:
                problems.append(
                    f"{ui.relative_to(REPO)}: parameter '{param}' in a combo box needs Annotated[str, Choice(...)]"
                )
            if kind == "node":
                types = _prop(el, "nodeTypes")
                listed = [s.text for s in types.iter("string")] if types is not None else []
                if node_class not in listed:
                    problems.append(
                        f"{ui.relative_to(REPO)}: widget '{name}' lists {listed} but parameter '{param}' "
                        f"holds a {node_class}"
                    )
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("module", MODULES)
def test_cmake_lists_every_file(module):
    lists = _cmake_lists()
    missing, stale = lists.differences(REPO / module)
    message = []
    if missing:
        message.append(f"{module}/CMakeLists.txt does not list: " + ", ".join(missing))
    if stale:
        message.append(f"{module}/CMakeLists.txt lists files that do not exist: " + ", ".join(stale))
    if message:
        message.append("Run: python Testing/cmake_file_lists.py")
    assert not message, "\n".join(message)


@pytest.mark.parametrize("module", MODULES)
def test_module_cmake_builds_and_registers_the_test(module):
    text = (REPO / module / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(rf"set\(MODULE_NAME\s+{module}\)", text)
    assert "slicerMacroBuildScriptedModule(" in text and "WITH_GENERIC_TESTS" in text
    assert re.search(r"if\(BUILD_TESTING\).*slicer_add_python_unittest\(SCRIPT \$\{MODULE_NAME\}\.py\)", text, re.S)
    # Classes of both module files (a module may derive from a class of a module it depends on).
    classes: Dict[str, List[str]] = {}
    for name in MODULES:
        for c in _tree(_module_file(name)).body:
            if isinstance(c, ast.ClassDef) and (name == module or c.name not in classes):
                classes[c.name] = [(_dotted(b) or "") for b in c.bases]

    def derives(name: str, base: str, depth: int = 0) -> bool:
        bases = classes.get(name, [])
        return base in bases or (depth < 5 and any(derives(b, base, depth + 1) for b in bases if b in classes))

    own = {c.name for c in _tree(_module_file(module)).body if isinstance(c, ast.ClassDef)}
    for suffix, base in (
        ("", "ScriptedLoadableModule"),
        ("Widget", "ScriptedLoadableModuleWidget"),
        ("Logic", "ScriptedLoadableModuleLogic"),
        ("Test", "ScriptedLoadableModuleTest"),
    ):
        assert module + suffix in own and derives(module + suffix, base), (
            f"{module}.py lacks class {module}{suffix}({base})"
        )


def test_top_level_cmake():
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    for var in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS"):
        assert re.search(rf"set\(EXTENSION_{var}\s", text), f"EXTENSION_{var} is not set"
    assert re.search(r'set\(EXTENSION_DEPENDS\s+"?PyTorch"?\)', text)
    assert "find_package(Slicer REQUIRED)" in text and "include(${Slicer_USE_FILE})" in text
    for module in MODULES:
        assert f"add_subdirectory({module})" in text
    assert text.index("include(${Slicer_EXTENSION_GENERATE_CONFIG})") < text.index("include(${Slicer_EXTENSION_CPACK})")
    assert "Apache License" in (REPO / "LICENSE.txt").read_text(encoding="utf-8")


def test_extension_urls_point_to_files_of_this_repository():
    """ICONURL and SCREENSHOTURLS on the project's main branch name files that exist here."""
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    urls = re.findall(r"https://raw\.githubusercontent\.com/[^/\s\"]+/[^/\s\"]+/main/([^\s\"]+)", text)
    assert len(urls) >= 2, "ICONURL and SCREENSHOTURLS should point to raw files of the repository"
    missing = [u for u in urls if not (REPO / u).is_file()]
    assert not missing, f"CMakeLists.txt points to files that do not exist: {missing}"


@pytest.mark.parametrize("module", MODULES)
def test_transform_selectors_show_every_transform_class(module):
    """A selector of vtkMRMLTransformNode must list its subclasses: results are Linear or BSpline nodes."""
    root = ET.parse(REPO / module / "Resources" / "UI" / f"{module}.ui").getroot()
    problems = []
    for widget in root.iter("widget"):
        if widget.get("class") != "qMRMLNodeComboBox":
            continue
        props = {p.get("name"): p for p in widget.findall("property")}
        types = [t.text for t in props["nodeTypes"].iter("string")] if "nodeTypes" in props else []
        show = props.get("showChildNodeTypes")
        shows_children = show is None or (show.find("bool") is not None and show.find("bool").text == "true")
        if "vtkMRMLTransformNode" in types and not shows_children:
            problems.append(
                f"{module}.ui: '{widget.get('name')}' hides vtkMRMLLinearTransformNode and the other subclasses"
            )
    assert not problems, "\n".join(problems)


def test_registration_declares_its_dependency_on_syntheticct():
    """SyntheticCTRegistration uses SyntheticCTLib and SyntheticCT's logic, so Slicer must load SyntheticCT first."""
    tree = _tree(_module_file("SyntheticCTRegistration"))
    declared = [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and any((_dotted(t) or "") == "self.parent.dependencies" for t in node.targets)
    ]
    assert declared and any(
        isinstance(v, ast.List) and any(isinstance(e, ast.Constant) and e.value == "SyntheticCT" for e in v.elts)
        for v in declared
    ), "SyntheticCTRegistration does not list SyntheticCT in self.parent.dependencies"


@pytest.mark.parametrize("module", MODULES)
def test_no_torch_at_module_import(module):
    """torch (and the heavy Lib parts) are imported inside functions only, never when Slicer loads the module."""
    tree = _tree(_module_file(module))
    problems = []
    for node in tree.body:
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        for n in names:
            if n.split(".")[0] in ("torch", "monai", "matplotlib", "PyTorchUtils") or n.endswith(
                ("inference", "training")
            ):
                problems.append(f"{module}.py:{node.lineno}: '{n}' is imported when the module loads")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("module", MODULES)
def test_lib_imports_at_module_load_do_not_pull_torch(module):
    """The Lib modules a module file imports when Slicer loads it import neither torch nor matplotlib."""
    names = set()
    for node in _tree(_module_file(module)).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0].endswith("Lib"):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.split(".")[0].endswith("Lib")}
    assert names, f"{module}.py imports nothing from its Lib at load time"
    script = (
        "import sys\n"
        + "".join(f"import {n}\n" for n in sorted(names))
        + ("heavy = sorted(m for m in ('torch', 'matplotlib', 'monai') if m in sys.modules)\nassert not heavy, heavy\n")
    )
    paths = [str(REPO / m) for m in MODULES]
    env = {"PYTHONPATH": os.pathsep.join(paths), "PATH": os.environ.get("PATH", "")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("module", MODULES)
def test_every_action_shows_its_errors(module):
    """Each on...Button handler wraps its work in slicer.util.tryWithErrorDisplay."""
    tree = _tree(_module_file(module))
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and re.match(r"on\w*(Button|Clicked|Toggled)$", node.name):
            if not any(
                isinstance(w, ast.With)
                and any(
                    (_dotted(i.context_expr.func) or "").endswith("tryWithErrorDisplay")
                    for i in w.items
                    if isinstance(i.context_expr, ast.Call)
                )
                for w in ast.walk(node)
            ):
                problems.append(f"{module}.py:{node.lineno}: {node.name} does not use slicer.util.tryWithErrorDisplay")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("module", MODULES)
def test_settings_keys_are_namespaced(module):
    """User settings live under "SyntheticCT/<key>" in QSettings."""
    problems = []
    path = _module_file(module)
    for node in ast.walk(_tree(path)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("value", "setValue")
        ):
            base = node.func.value
            if isinstance(base, ast.Call) and (_dotted(base.func) or "") == "qt.QSettings" and node.args:
                key = node.args[0]
                if (
                    isinstance(key, ast.Constant)
                    and isinstance(key.value, str)
                    and not key.value.startswith("SyntheticCT/")
                ):
                    problems.append(f"{_where(path, node)}: QSettings key '{key.value}' is not under 'SyntheticCT/'")
    assert not problems, "\n".join(problems)


def test_the_checker_catches_what_it_should(tmp_path, api):
    """The checks themselves: a file with one mistake of each kind is flagged for each."""
    bad = tmp_path / "Bad.py"
    bad.write_text(
        "import slicer, qt, ctk, sitkUtils\n"
        "def f(node):\n"
        "    slicer.util.loadVolumes('x')\n"
        "    slicer.util.loadVolume('x', returnNodes=True)\n"
        "    slicer.util.launchConsoleProcess(['a'], blocking=False)\n"
        "    slicer.vtkMRMLScalarVolumeNodeX()\n"
        "    slicer.modules.volumes.logic().CloneVolumeMagic(node)\n"
        "    slicer.modules.nosuchmodule\n"
        "    sitkUtils.PushVolume(node)\n"
        "    slicer.packaging.pip_ensure(['x'])\n"
        "    t = slicer.mrmlScene.AddNewNodeByClass('vtkMRMLTableNode')\n"
        "    t.SetNumberOfRowsMagic(3)\n"
        "    slicer.mrmlScene.AddNewNodeByClass('vtkMRMLNoSuchNode')\n"
        "    node.SetAndObserveColorNodeID('vtkMRMLColorTableNodeFileNoSuch.txt')\n"
        "    ctk.ctkNoSuchWidget()\n"
        "    vr = slicer.modules.volumerendering.logic()\n"
        "    vr.MakeItPretty(node)\n"
        "    slicer.mrmlScene.AddNewNodeMagic('x')\n"
        "    if hasattr(slicer, 'packaging'):\n"
        "        slicer.packaging.pip_ensure(['x'], requester='me')\n",
        encoding="utf-8",
    )
    found = "\n".join(_slicer_name_problems(bad))
    for expected in (
        "slicer.util.loadVolumes does not exist",
        "takes no keyword 'returnNodes'",
        "exists only from Slicer 5.12",
        "slicer.vtkMRMLScalarVolumeNodeX is not an MRML class",
        "logic().CloneVolumeMagic is not a known logic method",
        "slicer.modules.nosuchmodule",
        "sitkUtils.PushVolume does not exist",
        "slicer.packaging exists only from Slicer 5.12",
        "vtkMRMLTableNode has no method SetNumberOfRowsMagic",
        "'vtkMRMLNoSuchNode' is not an MRML class",
        "is not a color node ID",
        "ctk.ctkNoSuchWidget",
        "slicer.modules.volumerendering.logic() has no method MakeItPretty",
        "slicer.mrmlScene.AddNewNodeMagic is not in the API",
    ):
        assert expected in found, f"not flagged: {expected}\n{found}"
    assert found.count("slicer.packaging exists only") == 1  # the guarded call passes
