"""STAND-IN for the parts of the 3D Slicer application that the ``slicer-core`` wheel lacks.

Nothing here stands in for MRML: the scene, the nodes, the storage nodes and the module logics
(Volumes, Transforms, Models, Colors, Markups, Plots, Tables, Volume Rendering) are the real ones of
``slicer-core``, only wired together the way the application wires them. What is stood in:

- ``slicer.app``: user settings (an in-memory ``value``/``setValue`` store), ``temporaryPath``,
  ``testingEnabled()``, ``processEvents()``, ``startupEnvironment()`` (this process's environment),
  ``applicationLogic()`` and ``layoutManager()`` (None: there are no views without Qt);
- ``slicer.mrmlScene`` and ``slicer.modules.<name>.logic()``: a real ``vtkMRMLScene`` and the real
  logics bound to it (the application's module registry);
- ``slicer.ScriptedLoadableModule``: the four base classes (the Logic's ``getParameterNode`` keeps a
  real ``vtkMRMLScriptedModuleNode`` singleton, as Slicer's does);
- ``slicer.parameterNodeWrapper``: a small typed wrapper over that node (no GUI connection);
- ``slicer.i18n.tr`` (returns the text) and an empty ``qt`` module, so that any Qt use in a Logic
  class fails the tests.
"""

from __future__ import annotations

import enum
import os
import pathlib
import sys
import tempfile
import types
import typing
import unittest
from typing import Any, Dict, Optional

import slicer  # slicer-core

_LOGIC_CLASSES = {
    "volumes": "vtkSlicerVolumesLogic",
    "transforms": "vtkSlicerTransformLogic",
    "models": "vtkSlicerModelsLogic",
    "colors": "vtkSlicerColorLogic",
    "markups": "vtkSlicerMarkupsLogic",
    "plots": "vtkSlicerPlotsLogic",
    "tables": "vtkSlicerTablesLogic",
    "volumerendering": "vtkSlicerVolumeRenderingLogic",
}


class _Settings:
    """``slicer.app.userSettings()``: the ``value``/``setValue`` part of QSettings, in memory."""

    def __init__(self) -> None:
        self.values: Dict[str, Any] = {}

    def value(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def setValue(self, key: str, value: Any) -> None:  # noqa: N802 - Qt's name
        self.values[key] = value

    def remove(self, key: str) -> None:
        self.values.pop(key, None)


class _Environment:
    """``slicer.app.startupEnvironment()``: the ``keys``/``value`` part of QProcessEnvironment."""

    def __init__(self, env: Dict[str, str]) -> None:
        self.env = dict(env)

    def keys(self):
        return list(self.env)

    def value(self, key: str, default: str = "") -> str:
        return self.env.get(key, default)


class _App:
    def __init__(self, temporary: str) -> None:
        self.temporaryPath = temporary
        self.settings = _Settings()
        self._applicationLogic = None

    def userSettings(self) -> _Settings:  # noqa: N802
        return self.settings

    def testingEnabled(self) -> bool:  # noqa: N802
        return True

    def processEvents(self) -> None:  # noqa: N802
        pass

    def startupEnvironment(self) -> _Environment:  # noqa: N802
        return _Environment(dict(os.environ))

    def applicationLogic(self):  # noqa: N802
        return self._applicationLogic

    def layoutManager(self):  # noqa: N802 - no views without Qt
        return None


class _Module:
    def __init__(self, logic) -> None:
        self._logic = logic

    def logic(self):
        return self._logic


# -- slicer.ScriptedLoadableModule ----------------------------------------------------------------------
class ScriptedLoadableModule:
    def __init__(self, parent=None) -> None:
        self.parent = parent if parent is not None else types.SimpleNamespace()


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None) -> None:
        self.parent = parent


class ScriptedLoadableModuleLogic:
    """Slicer's base: ``moduleName`` from the class name; the parameter node is a scene singleton."""

    def __init__(self, parent=None) -> None:
        name = self.__class__.__name__
        self.moduleName = name[: -len("Logic")] if name.endswith("Logic") else name

    def getParameterNode(self):  # noqa: N802
        scene = slicer.mrmlScene
        node = scene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
            node.UnRegister(None)
            node.SetSingletonTag(self.moduleName)
            node.SetName(scene.GenerateUniqueName(self.moduleName))
            node = scene.AddNode(node)
        return node


class ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message, msec=0):  # noqa: N802
        pass


# -- slicer.parameterNodeWrapper -----------------------------------------------------------------------
class WithinRange:
    def __init__(self, low: float, high: float) -> None:
        self.low, self.high = low, high


def _base_type(annotation):
    if typing.get_origin(annotation) is typing.Annotated:
        return typing.get_args(annotation)[0]
    return annotation


def parameterNodeWrapper(cls):  # noqa: N802 - Slicer's name
    """Typed fields of ``cls`` stored in a real vtkMRMLScriptedModuleNode (parameters and node references)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {name: _base_type(t) for name, t in hints.items()}

    def is_node(t) -> bool:
        return isinstance(t, type) and issubclass(t, slicer.vtkMRMLNode)

    def getter(name):
        t = fields[name]

        def get(self):
            node = self.parameterNode
            if is_node(t):
                return node.GetNodeReference(name)
            text = node.GetParameter(name)
            if not text:
                return getattr(cls, name, None)
            if t is bool:
                return text == "true"
            if t in (int, float, str):
                return t(text)
            if isinstance(t, type) and issubclass(t, enum.Enum):
                return t(text)
            if t is pathlib.Path:
                return pathlib.Path(text)
            return text

        return get

    def setter(name):
        t = fields[name]

        def set_(self, value):
            node = self.parameterNode
            if is_node(t):
                node.SetNodeReferenceID(name, value.GetID() if value is not None else None)
            elif t is bool:
                node.SetParameter(name, "true" if value else "false")
            elif isinstance(value, enum.Enum):
                node.SetParameter(name, str(value.value))
            else:
                node.SetParameter(name, str(value))

        return set_

    namespace: Dict[str, Any] = {"__doc__": cls.__doc__, "_fields": fields}

    def __init__(self, parameterNode) -> None:  # noqa: N807
        self.parameterNode = parameterNode

    def getValue(self, name):  # noqa: N802
        return getattr(self, name)

    def setValue(self, name, value):  # noqa: N802
        setattr(self, name, value)

    namespace.update(__init__=__init__, getValue=getValue, setValue=setValue)
    for name in fields:
        namespace[name] = property(getter(name), setter(name))
    return type(cls.__name__, (), namespace)


# -- installation ----------------------------------------------------------------------------------------
_installed: Optional[_App] = None


def install() -> _App:
    """Put the stand-ins into ``slicer`` and ``sys.modules`` once; return ``slicer.app``."""
    global _installed
    if _installed is not None:
        return _installed
    app = _App(tempfile.mkdtemp(prefix="SlicerStandinTemp-"))
    slicer.app = app
    slicer.modules = types.SimpleNamespace()
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    for cls in (
        ScriptedLoadableModule,
        ScriptedLoadableModuleWidget,
        ScriptedLoadableModuleLogic,
        ScriptedLoadableModuleTest,
    ):
        setattr(scripted, cls.__name__, cls)
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = parameterNodeWrapper
    wrapper.WithinRange = WithinRange
    for name, module in (
        ("slicer.i18n", i18n),
        ("slicer.ScriptedLoadableModule", scripted),
        ("slicer.parameterNodeWrapper", wrapper),
    ):
        sys.modules[name] = module
        setattr(slicer, name.split(".", 1)[1], module)
    sys.modules.setdefault("qt", types.ModuleType("qt"))  # empty: a Logic that uses Qt fails here
    _installed = app
    new_scene()
    return app


def new_scene():
    """A fresh real vtkMRMLScene as ``slicer.mrmlScene``, with the application and module logics bound to it."""
    old = getattr(slicer, "mrmlScene", None)
    if old is not None:  # detach the previous scene's logics before they go
        for name in _LOGIC_CLASSES:
            getattr(slicer.modules, name).logic().SetMRMLScene(None)
        slicer.app._applicationLogic.SetMRMLScene(None)
        old.Clear(1)
    scene = slicer.vtkMRMLScene()
    appLogic = slicer.vtkSlicerApplicationLogic()
    appLogic.SetMRMLScene(scene)
    slicer.app._applicationLogic = appLogic
    slicer.mrmlScene = scene
    for name, cls in _LOGIC_CLASSES.items():
        logic = getattr(slicer, cls)()
        if hasattr(logic, "SetMRMLApplicationLogic"):
            logic.SetMRMLApplicationLogic(appLogic)
        logic.SetMRMLScene(scene)
        setattr(slicer.modules, name, _Module(logic))
    appLogic.SetColorLogic(slicer.modules.colors.logic())
    return scene
