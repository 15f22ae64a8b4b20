"""SyntheticCT: a synthetic CT from MRI in one click. Not for diagnostic use.

A thin GUI over SyntheticCTLib. The input volumes are written to a temporary folder and the
library's command line (``PythonSlicer -m SyntheticCTLib synthesize ... --progress json``) runs in a
child process, so that Slicer never freezes; its progress lines drive the progress bar, and the
result is loaded back and checked against the input's geometry. Nothing here computes.
"""

import enum
import logging
import os
import pathlib
import shutil
import tempfile
import time
import weakref
from typing import Callable, List, Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from SyntheticCTLib import NOT_FOR_DIAGNOSTIC_USE
from SyntheticCTLib.apps.runner import (
    JobResult,
    JobSlot,
    RunnerEvent,
    child_environment,
    describe_event,
    ensure_packages,
    find_python,
    library_path,
    missing_packages,
    models_add_args,
    models_fetch_args,
    synthesize_args,
)

MAX_INPUTS = 6
"""Input selectors in the GUI; a model with more channels runs from the command line."""
SETTINGS_CACHE_DIR = "SyntheticCT/cacheDir"
SETTINGS_DEVICE = "SyntheticCT/device"
POLL_MS = 100
MINIMUM_TORCH = "2.1"
# Packages the child process needs beyond what Slicer ships (numpy, scipy, SimpleITK, vtk, pydicom).
SYNTHESIS_PACKAGES = {"safetensors": "safetensors>=0.4"}
SYNTHETIC_ATTRIBUTE = "SyntheticCT.Synthetic"
MODEL_ATTRIBUTE = "SyntheticCT.Model"
OUTPUT_ATTRIBUTE = "SyntheticCT.Output"
"""Set on the modules' derived volumes (checkerboard, difference, uncertainty): never offered as inputs."""
SLICER_OWN_PACKAGES = ("torch", "SimpleITK", "numpy", "vtk")
"""Never pip-installed into Slicer (torch comes from the PyTorch extension, the others are Slicer's own)."""


#
# SyntheticCT
#


class SyntheticCT(ScriptedLoadableModule):
    """Module description shown in Slicer."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Synthetic CT")
        self.parent.categories = [_("Synthetic CT")]
        self.parent.dependencies = []
        self.parent.contributors = ["SyntheticCT contributors"]
        self.parent.helpText = _(
            "Generate a synthetic CT (sCT) from one or several MRI volumes (for example the echoes of a 3D "
            "multi-echo gradient echo) with a model from the catalog. Choose the model, then one volume per model "
            "input, and click Apply. The model runs in a separate process: the progress bar shows how far it is and "
            "Cancel stops it. <b>Not for diagnostic use.</b> "
            'See the <a href="https://github.com/SyntheticCT/SlicerSyntheticCT#readme">documentation</a>.'
        )
        self.parent.acknowledgementText = _(
            "SyntheticCT is open source (Apache-2.0). The module layout follows the 3D Slicer scripted module "
            "template; the child-process handling is modelled on SlicerMONAIAuto3DSeg and SlicerTotalSegmentator."
        )


#
# Parameters
#


class Device(enum.Enum):
    """Where the model runs."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"

    def label(self) -> str:
        return {"auto": _("Automatic (GPU when available)"), "cpu": _("CPU"), "cuda": _("GPU (CUDA)")}[self.value]


@parameterNodeWrapper
class SyntheticCTParameterNode:
    """The module's parameters, saved with the scene.

    inputVolume1..6 - the MRI volumes, in the order of the model's inputs.
    outputVolume - receives the synthetic CT (a new volume when empty).
    uncertaintyVolume - receives the uncertainty map, when requested (set by the module).
    model - catalog name of the model.
    device - where the model runs.
    """

    inputVolume1: vtkMRMLScalarVolumeNode
    inputVolume2: vtkMRMLScalarVolumeNode
    inputVolume3: vtkMRMLScalarVolumeNode
    inputVolume4: vtkMRMLScalarVolumeNode
    inputVolume5: vtkMRMLScalarVolumeNode
    inputVolume6: vtkMRMLScalarVolumeNode
    outputVolume: vtkMRMLScalarVolumeNode
    uncertaintyVolume: vtkMRMLScalarVolumeNode
    model: str = "default"
    device: Device = Device.AUTO
    showBone3D: bool = False
    computeUncertainty: bool = False
    exportDicom: bool = False
    dicomDirectory: pathlib.Path = pathlib.Path()  # "." = not chosen: "Export now" asks for a folder


#
# SyntheticCTWidget
#


class SyntheticCTWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: Optional[SyntheticCTLogic] = None
        self._parameterNode: Optional[SyntheticCTParameterNode] = None
        self._parameterNodeGuiTag = None
        self._models: list = []
        self._card: Optional[dict] = None
        self._updatingModels = False

    # -- setup -------------------------------------------------------------------------------------
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SyntheticCT.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SyntheticCTLogic()
        self.logic.jobs.schedule = lambda ms, callback: qt.QTimer.singleShot(ms, callback)

        self._inputSelectors = [
            self.ui.inputSelector1,
            self.ui.inputSelector2,
            self.ui.inputSelector3,
            self.ui.inputSelector4,
            self.ui.inputSelector5,
            self.ui.inputSelector6,
        ]
        self._inputLabels = [
            self.ui.inputLabel1,
            self.ui.inputLabel2,
            self.ui.inputLabel3,
            self.ui.inputLabel4,
            self.ui.inputLabel5,
            self.ui.inputLabel6,
        ]
        self.ui.inputWarningsLabel.visible = False
        self.ui.cacheDirectoryButton.directory = self.logic.cacheDirectory()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelSelected)
        self.ui.addModelUrlButton.connect("clicked(bool)", self.onAddModelUrlButton)
        self.ui.addModelFileButton.connect("clicked(bool)", self.onAddModelFileButton)
        self.ui.openModelFolderButton.connect("clicked(bool)", self.onOpenModelFolderButton)
        self.ui.clearCacheButton.connect("clicked(bool)", self.onClearCacheButton)
        self.ui.checkInputsButton.connect("clicked(bool)", self.onCheckInputsButton)
        self.ui.exportDicomButton.connect("clicked(bool)", self.onExportDicomButton)
        self.ui.cacheDirectoryButton.connect("directoryChanged(QString)", self.onCacheDirectoryChanged)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)

        self.initializeParameterNode()
        self.refreshModels()

    def cleanup(self) -> None:
        if self.logic is not None:
            self.logic.cleanup()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        parameters = self.logic.getParameterNode()
        self.logic.initializeParameters(parameters)
        self.setParameterNode(parameters)

    def setParameterNode(self, inputParameterNode: Optional[SyntheticCTParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._selectModelInCombo(self._parameterNode.model)
            self._checkCanApply()

    # -- models ------------------------------------------------------------------------------------
    def refreshModels(self) -> None:
        """Fill the model selector from the catalog (bundled, downloaded and user-added models)."""
        with slicer.util.tryWithErrorDisplay(_("Could not read the model catalog."), waitCursor=True):
            self._models = self.logic.models()
            self._updatingModels = True
            try:
                self.ui.modelComboBox.clear()
                for entry in self._models:
                    status = {
                        "bundled": _("bundled"),
                        "cached": _("on this computer"),
                        "available": _("download needed"),
                        "outdated": _("update available"),
                        "missing": _("files missing"),
                    }.get(entry.status, entry.status)
                    self.ui.modelComboBox.addItem(f"{entry.name} {entry.version} ({status})", entry.name)
            finally:
                self._updatingModels = False
            wanted = self._parameterNode.model if self._parameterNode else "default"
            self._selectModelInCombo(wanted)
            self.onModelSelected(self.ui.modelComboBox.currentIndex)

    def _selectModelInCombo(self, name: str) -> None:
        if not self._models:
            return
        name = self.logic.canonicalModelName(name)
        for index, entry in enumerate(self._models):
            if entry.name == name and self.ui.modelComboBox.currentIndex != index:
                self.ui.modelComboBox.currentIndex = index
                return

    def _currentEntry(self):
        index = self.ui.modelComboBox.currentIndex
        return self._models[index] if 0 <= index < len(self._models) else None

    def onModelSelected(self, index: int) -> None:
        if self._updatingModels:
            return
        with slicer.util.tryWithErrorDisplay(_("Could not read the model's description."), waitCursor=True):
            self._showModel()

    def _showModel(self) -> None:
        entry = self._currentEntry()
        if entry is None:
            self.ui.modelInfoLabel.text = _("No model in the catalog.")
            return
        if self._parameterNode and self._parameterNode.model != entry.name:
            self._parameterNode.model = entry.name
        self._card = self.logic.modelCard(entry)
        self.ui.modelInfoLabel.text = self.logic.describeModel(entry, self._card)
        self.ui.diagnosticLabel.text = (self._card or {}).get("diagnostic_use") or NOT_FOR_DIAGNOSTIC_USE
        self._showInputs(self.logic.inputLabels(entry, self._card))
        self.ui.inputWarningsLabel.visible = False

    def _showInputs(self, labels: List[str]) -> None:
        for i, (label, selector) in enumerate(zip(self._inputLabels, self._inputSelectors)):
            used = i < len(labels)
            label.visible = used
            selector.visible = used
            if used:
                label.text = f"{labels[i]}:"
                selector.toolTip = _("The MRI volume for the model's input '{label}'.").format(label=labels[i])
        if len(labels) > MAX_INPUTS:
            self._setStatus(
                _(
                    "This model needs {n} inputs; the module shows {m}. Use the command line "
                    "(syntheticct synthesize) for it."
                ).format(n=len(labels), m=MAX_INPUTS)
            )
        self._checkCanApply()

    def _inputNodes(self) -> list:
        n = min(max(len(self.logic.inputLabels(self._currentEntry(), self._card)), 1), MAX_INPUTS)
        return [self._parameterNode.getValue(f"inputVolume{i + 1}") for i in range(n)]

    def onAddModelUrlButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not add the model."), waitCursor=False):
            url = qt.QInputDialog.getText(
                slicer.util.mainWindow(), _("Add a model from a URL"), _("URL of the model package (.zip):")
            )
            if not url:
                return
            sha256 = qt.QInputDialog.getText(
                slicer.util.mainWindow(),
                _("Add a model from a URL"),
                _("Its SHA-256 checksum (from the model's provider):"),
            )
            if not sha256:
                slicer.util.warningDisplay(
                    _("A model from a URL needs its SHA-256, so that a corrupted or tampered download is refused.")
                )
                return
            if not self._ensurePackages():
                return
            self._startJob(
                self.logic.startAddModel(
                    url.strip(), sha256.strip(), onEvent=self._onJobEvent, onFinished=self._onAddModelFinished
                ),
                _("Adding the model"),
            )

    def onAddModelFileButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not add the model."), waitCursor=False):
            path = qt.QFileDialog.getOpenFileName(
                slicer.util.mainWindow(), _("Add a model package"), "", _("Model package (*.zip model.json)")
            )
            if not path:
                return
            source = os.path.dirname(path) if os.path.basename(path) == "model.json" else path
            if not self._ensurePackages():
                return
            self._startJob(
                self.logic.startAddModel(source, None, onEvent=self._onJobEvent, onFinished=self._onAddModelFinished),
                _("Adding the model"),
            )

    @staticmethod
    def _confirm(text: str, title: str) -> bool:
        return bool(slicer.util.confirmOkCancelDisplay(text, title))

    def _ensurePackages(self) -> bool:
        """torch (from the PyTorch extension) and the child's packages; the model check and the synthesis need them."""
        if self.logic.ensureTorch(confirm=self._confirm) and self.logic.ensurePythonPackages(
            SYNTHESIS_PACKAGES, confirm=self._confirm
        ):
            return True
        self._setStatus(_("Not started: the required Python packages are not installed."))
        return False

    def _onAddModelFinished(self, result: JobResult, outcome: Optional[dict] = None) -> None:
        self._jobEnded(result)
        if result.ok:
            self.refreshModels()
        elif not result.cancelled:
            slicer.util.errorDisplay(_("The model could not be added: {error}").format(error=result.describe()))

    def onOpenModelFolderButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not open the model folder."), waitCursor=False):
            folder = pathlib.Path(self.logic.cacheDirectory())
            folder.mkdir(parents=True, exist_ok=True)
            qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(folder)))

    def onClearCacheButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not clear the model cache."), waitCursor=True):
            if not slicer.util.confirmOkCancelDisplay(
                _(
                    "Delete the downloaded models? They are downloaded again when needed. Models you added from "
                    "files are kept."
                ),
                _("Clear the model cache"),
            ):
                return
            freed = self.logic.clearCache()
            self._setStatus(_("Freed {mb:.0f} MB.").format(mb=freed / 1e6))
            self.refreshModels()

    def onDeviceChanged(self, index: int) -> None:
        # This slot may run before the parameter node hears of the change: save once it has.
        qt.QTimer.singleShot(0, self._saveDevice)

    def _saveDevice(self) -> None:
        if self._parameterNode is not None:
            self.logic.saveDefaultDevice(self._parameterNode.device.value)

    def onCacheDirectoryChanged(self, path: str) -> None:
        self.logic.setCacheDirectory(path)
        self.refreshModels()

    # -- inputs ------------------------------------------------------------------------------------
    def onCheckInputsButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not check the inputs."), waitCursor=True):
            self._showInputWarnings(self._checkInputs())

    def _checkInputs(self) -> List[str]:
        nodes = self._inputNodes()
        if not all(nodes):
            return [_("Choose a volume for every input.")]
        if self._card is None:
            return [
                _(
                    "The model is not on this computer yet, so the inputs can be checked only after it is "
                    "downloaded (on Apply)."
                )
            ]
        return self.logic.checkInputs(nodes, self._card)

    def _showInputWarnings(self, warnings: List[str]) -> None:
        self.ui.inputWarningsLabel.visible = True
        if warnings:
            self.ui.inputWarningsLabel.text = "<br>".join(f"&bull; {w}" for w in warnings)
        else:
            self.ui.inputWarningsLabel.text = _("The inputs look like the model's training data.")

    # -- apply / cancel ----------------------------------------------------------------------------
    def _checkCanApply(self, caller=None, event=None) -> None:
        if self.logic is not None and self.logic.isRunning():
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the running job; the scene is left unchanged.")
            self.ui.applyButton.enabled = True
            return
        self.ui.applyButton.text = _("Apply")
        entry = self._currentEntry()
        fits = entry is not None and len(self.logic.inputLabels(entry, self._card)) <= MAX_INPUTS
        ready = self._parameterNode is not None and fits and all(self._inputNodes())
        self.ui.applyButton.enabled = bool(ready)
        self.ui.applyButton.toolTip = (
            _("Generate the synthetic CT.") if ready else _("Choose a model and a volume for every input.")
        )

    def onApplyButton(self) -> None:
        if self.logic.isRunning():
            self.logic.cancel()
            self._setStatus(_("Cancelling..."))
            return
        with slicer.util.tryWithErrorDisplay(_("Synthetic CT generation failed."), waitCursor=True):
            entry = self._currentEntry()
            if not self._ensurePackages():
                return
            if entry.status in ("available", "outdated"):
                size = f" ({entry.size / 1e6:.0f} MB)" if entry.size else ""
                if not slicer.util.confirmOkCancelDisplay(
                    _(
                        "The model '{name}'{size} is not on this computer yet. Download it now from {url}? "
                        "Its checksum is verified before use."
                    ).format(name=entry.name, size=size, url=entry.url),
                    _("Download the model"),
                ):
                    return
                self._startJob(
                    self.logic.startFetchModel(entry.name, onEvent=self._onJobEvent, onFinished=self._onFetchFinished),
                    _("Downloading the model"),
                )
                return
            self._startSynthesis()

    def _onFetchFinished(self, result: JobResult, outcome: Optional[dict] = None) -> None:
        self._jobEnded(result)
        if not result.ok:
            if not result.cancelled:
                slicer.util.errorDisplay(
                    _("The model could not be downloaded: {error}").format(error=result.describe())
                )
            return
        self.refreshModels()
        with slicer.util.tryWithErrorDisplay(_("Synthetic CT generation failed."), waitCursor=True):
            self._startSynthesis()

    def _startSynthesis(self) -> None:
        p = self._parameterNode
        nodes = self._inputNodes()
        if self._card is not None:
            warnings = self.logic.checkInputs(nodes, self._card)
            self._showInputWarnings(warnings)
            if warnings and not slicer.util.confirmYesNoDisplay(
                _("The input differs from the data this model was trained on:\n\n{w}\n\nRun the model anyway?").format(
                    w="\n".join(f"- {w}" for w in warnings)
                ),
                _("Input check"),
            ):
                self._setStatus(_("Not started."))
                return
        dicomDir = (
            str(p.dicomDirectory) if p.exportDicom and p.dicomDirectory and str(p.dicomDirectory) != "." else None
        )
        if p.exportDicom and not dicomDir:
            raise ValueError(_("Choose a folder for the DICOM export, or untick 'Export DICOM to'."))
        job = self.logic.startSynthesis(
            nodes,
            p.outputVolume,
            model=p.model,
            device=p.device.value,
            computeUncertainty=p.computeUncertainty,
            dicomParentDirectory=dicomDir,
            showBone3D=p.showBone3D,
            onEvent=self._onJobEvent,
            onFinished=self._onSynthesisFinished,
        )
        self._startJob(job, _("Generating the synthetic CT"))

    def _startJob(self, job, what: str) -> None:
        self.ui.progressBar.value = 0
        self.ui.logTextEdit.appendPlainText(f"--- {what} ({time.strftime('%H:%M:%S')})")
        self._setStatus(what + "...")
        self._checkCanApply()

    def _onJobEvent(self, event: RunnerEvent) -> None:
        if event.kind == "progress":
            self.ui.progressBar.value = int(round(1000 * (event.fraction or 0.0)))
            self._setStatus(describe_event(event))
        elif event.text:
            self.ui.logTextEdit.appendPlainText(event.text)

    def _jobEnded(self, result: JobResult) -> None:
        self.ui.logTextEdit.appendPlainText(result.describe())
        if result.ok:
            self.ui.progressBar.value = 1000
        self._setStatus(result.describe())
        self._checkCanApply()

    def _onSynthesisFinished(self, result: JobResult, outcome: Optional[dict] = None) -> None:
        self._jobEnded(result)
        outcome = outcome or {}
        if outcome.get("error"):
            slicer.util.errorDisplay(_("Synthetic CT generation failed: {error}").format(error=outcome["error"]))
            return
        if not result.ok:
            if not result.cancelled:
                slicer.util.errorDisplay(_("Synthetic CT generation failed: {error}").format(error=result.describe()))
            return
        node = outcome.get("volume")
        if node is not None:
            self._parameterNode.outputVolume = node
            self._parameterNode.uncertaintyVolume = outcome.get("uncertainty")
            slicer.util.resetSliceViews()
            if self._parameterNode.showBone3D:
                slicer.util.resetThreeDViews()
        self._setStatus(outcome.get("message") or result.describe())

    def onExportDicomButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("DICOM export failed."), waitCursor=True):
            p = self._parameterNode
            node = p.outputVolume
            if node is None:
                raise ValueError(_("Choose the synthetic CT volume to export (Output section)."))
            parent = str(p.dicomDirectory) if p.dicomDirectory and str(p.dicomDirectory) != "." else ""
            if not parent:
                parent = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Folder for the DICOM series"))
                if not parent:
                    return
            if not node.GetAttribute(SYNTHETIC_ATTRIBUTE) and not slicer.util.confirmYesNoDisplay(
                _("'{n}' was not made by SyntheticCT. Export it as a synthetic CT anyway?").format(n=node.GetName())
            ):
                return
            folder = self.logic.exportDicom(node, parent)
            self._setStatus(_("DICOM series written to {folder}").format(folder=folder))

    def _setStatus(self, text: str) -> None:
        self.ui.statusLabel.text = text


#
# SyntheticCTJobLogic (shared by both modules)
#


class SyntheticCTJobLogic(ScriptedLoadableModuleLogic):
    """What both modules' logics share, without Qt: one child job at a time, its files, and the scene.

    - ``self.jobs`` (:class:`JobSlot`) runs the library's command line; the widget sets
      ``jobs.schedule`` to ``qt.QTimer.singleShot``, tests and scripts pass ``wait=True``.
    - Closing the scene cancels the running job, and a result that arrives afterwards is dropped:
      nothing lands in the new scene. Work folders (copies of the volumes) are removed when a job
      ends, and the ones kept for later (a report to save) when the scene closes or on :meth:`cleanup`.
    - Volumes go to the child as files written by MRML storage nodes, in the volume's own space (the
      parent transform is not applied), and come back through storage nodes or the Volumes logic.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.jobs = JobSlot(label="SyntheticCT", poll_ms=POLL_MS)
        self._sceneGeneration = 0
        self._keptFolders: List[str] = []
        self._observedScene = None
        self._sceneObserverTag = None
        self.observeScene(slicer.mrmlScene)

    # -- scene -------------------------------------------------------------------------------------
    def observeScene(self, scene) -> None:
        """Cancel jobs and drop their results when ``scene`` closes (called with slicer.mrmlScene)."""
        if self._observedScene is not None and self._sceneObserverTag is not None:
            self._observedScene.RemoveObserver(self._sceneObserverTag)
        self._observedScene, self._sceneObserverTag = scene, None
        if scene is not None:
            this = weakref.ref(self)  # the scene must not keep a forgotten logic alive

            def onClose(caller, event) -> None:
                logic = this()
                if logic is not None:
                    logic.onSceneStartClose(caller, event)

            self._sceneObserverTag = scene.AddObserver(slicer.vtkMRMLScene.StartCloseEvent, onClose)

    def onSceneStartClose(self, caller=None, event=None) -> None:
        """The scene closes: stop the job (its result is dropped) and remove the kept work folders."""
        self._sceneGeneration += 1
        self.cancel()
        self.removeKeptFolders()

    def cleanup(self) -> None:
        """Stop observing the scene, cancel the job and remove every work folder (module cleanup)."""
        self.cancel()
        self.observeScene(None)
        self.removeKeptFolders()

    # -- jobs --------------------------------------------------------------------------------------
    def isRunning(self) -> bool:
        return self.jobs.is_running()

    def cancel(self) -> None:
        """Stop the running child process and everything it started; the scene is left unchanged."""
        self.jobs.cancel()

    @staticmethod
    def pythonExecutable() -> str:
        """Slicer's Python launcher (``PythonSlicer``), for the child process."""
        return find_python(("PythonSlicer",))

    @staticmethod
    def cacheDirectory() -> str:
        """The model cache folder: the user's choice, else the library's default (outside the extension)."""
        chosen = slicer.app.userSettings().value(SETTINGS_CACHE_DIR, "")
        if chosen:
            return str(chosen)
        from SyntheticCTLib.models.cache import cache_dir

        return str(cache_dir(create=False))

    def childEnvironment(self, device: str = "auto") -> dict:
        """Slicer's start-up environment, plus the Lib folder, the device choice and the model cache."""
        return child_environment(
            slicer.util.startupEnvironment(),
            python_paths=[library_path()],
            device=device,
            cache_dir=self.cacheDirectory(),
        )

    def runJob(
        self,
        args: List[str],
        *,
        env: Optional[dict] = None,
        work: str,
        importResult,
        onEvent=None,
        onFinished=None,
        keepWork=None,
        wait: bool = False,
    ):
        """Start ``args``; when it succeeds (and the scene is still the same) ``importResult()`` loads it.

        ``env`` defaults to :meth:`childEnvironment` with the automatic device.

        ``onFinished(result, outcome)`` gets the :class:`JobResult` and the dict ``importResult``
        returned (or ``{"error": ...}``). ``work`` is removed afterwards unless ``keepWork(outcome)``.
        """
        generation = self._sceneGeneration

        def finished(result: JobResult) -> None:
            outcome: dict = {}
            if generation != self._sceneGeneration:  # the scene was closed meanwhile: drop the result
                result = JobResult(result.returncode, True, "")
            try:
                if result.ok:
                    outcome = importResult() or {}
            except Exception as e:  # reported to the user by onFinished
                logging.exception("SyntheticCT: could not load the result")
                outcome = {"error": str(e)}
            finally:
                if result.ok and not outcome.get("error") and keepWork is not None and keepWork(outcome):
                    self._keptFolders.append(str(work))
                else:
                    shutil.rmtree(work, ignore_errors=True)
            if onFinished is not None:
                onFinished(result, outcome)

        try:
            return self.jobs.start(
                args,
                env=env if env is not None else self.childEnvironment(),
                on_event=onEvent,
                on_finished=finished,
                wait=wait,
                idle=slicer.app.processEvents,
            )
        except Exception:
            shutil.rmtree(work, ignore_errors=True)
            raise

    def removeKeptFolders(self) -> None:
        for folder in self._keptFolders:
            shutil.rmtree(folder, ignore_errors=True)
        self._keptFolders = []

    # -- files -------------------------------------------------------------------------------------
    @staticmethod
    def workDirectory(key: str) -> pathlib.Path:
        """A new, empty folder in Slicer's temporary folder."""
        parent = pathlib.Path(slicer.app.temporaryPath)
        parent.mkdir(parents=True, exist_ok=True)
        return pathlib.Path(tempfile.mkdtemp(prefix=f"{key}-", dir=str(parent)))

    @staticmethod
    def writeVolume(node, path) -> pathlib.Path:
        """The node's voxels and grid (without its parent transform) as a file, through an MRML storage node."""
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(path))
        storage.SetUseCompression(0)
        if not storage.WriteData(node):
            raise RuntimeError(_("Could not write '{n}' to {p}.").format(n=node.GetName(), p=path))
        return pathlib.Path(path)

    @staticmethod
    def readVolume(path, node=None, name: str = "volume"):
        """Read a volume file into ``node`` (a new scalar volume node when None) through an MRML storage node."""
        created = node is None
        if created:
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(path))
        if not storage.ReadData(node):
            if created:
                slicer.mrmlScene.RemoveNode(node)
            raise RuntimeError(_("Could not read the volume {p}.").format(p=path))
        if node.GetDisplayNode() is None:
            node.CreateDefaultDisplayNodes()
        return node

    @staticmethod
    def sitkImage(node):
        """The node's voxels and grid (without its parent transform) as a SimpleITK image (LPS)."""
        import numpy as np
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(slicer.util.arrayFromVolume(node))
        matrix = vtk.vtkMatrix4x4()
        node.GetIJKToRASDirectionMatrix(matrix)
        ras = np.array([[matrix.GetElement(r, c) for c in range(3)] for r in range(3)])
        flip = np.diag([-1.0, -1.0, 1.0])
        image.SetDirection((flip @ ras).flatten().tolist())
        origin = node.GetOrigin()
        image.SetOrigin((-origin[0], -origin[1], origin[2]))
        image.SetSpacing(node.GetSpacing())
        return image

    @staticmethod
    def isOwnOutput(node) -> bool:
        return bool(node.GetAttribute(OUTPUT_ATTRIBUTE))

    @staticmethod
    def candidateVolumes(synthetic: Optional[bool] = None) -> list:
        """Scalar volumes a user would pick as inputs: no label maps, none of the modules' own derived outputs.

        ``synthetic`` True keeps only synthetic CTs, False drops them, None keeps both.
        """
        volumes = []
        for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
            if node.IsA("vtkMRMLLabelMapVolumeNode") or node.GetAttribute(OUTPUT_ATTRIBUTE):
                continue
            isSynthetic = node.GetAttribute(SYNTHETIC_ATTRIBUTE) == "1"
            if synthetic is None or synthetic == isSynthetic:
                volumes.append(node)
        return volumes

    # -- Python packages ---------------------------------------------------------------------------
    @staticmethod
    def torchAvailable() -> bool:
        """True when PyTorch can be imported here (Slicer's Python, which the child also runs)."""
        return not missing_packages({"torch": "torch"})

    @staticmethod
    def ensureTorch(confirm=None) -> bool:
        """Make PyTorch available through the PyTorch extension (PyTorchUtils).

        Without ``confirm`` nothing is installed: False when torch is absent (self-tests then skip).
        ``confirm(text, title)`` returning False declines. The PyTorch extension's absence is an error.
        """
        if SyntheticCTJobLogic.torchAvailable():
            return True
        if confirm is None:
            return False
        try:
            import PyTorchUtils
        except ModuleNotFoundError as e:
            raise RuntimeError(
                _(
                    "SyntheticCT needs the PyTorch extension. Install 'PyTorch' from the Extensions "
                    "Manager, restart Slicer, and try again."
                )
            ) from e
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if torchLogic.torchInstalled():
            return True
        if not confirm(
            _(
                "SyntheticCT runs its models with PyTorch, which is not installed yet. Download and install it now? "
                "This needs a network connection and may take several minutes (1-3 GB)."
            ),
            _("Install PyTorch"),
        ):
            return False
        torch = torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=f">={MINIMUM_TORCH}")
        if torch is None:
            raise RuntimeError(_("PyTorch could not be installed. Use the 'PyTorch Utils' module to install it."))
        return True

    @staticmethod
    def ensurePythonPackages(packages: dict, confirm=None) -> bool:
        """True when every module of ``packages`` ({import name: requirement}) can be imported.

        The missing ones are installed only when ``confirm`` is given (Slicer 5.12+ asks the user
        itself through ``slicer.packaging``; older versions ask ``confirm(text, title)`` first).
        """
        if not missing_packages(packages):
            return True
        if confirm is None:
            return False

        def install(missing: List[str]) -> None:
            if hasattr(slicer, "packaging"):  # Slicer 5.12+
                slicer.packaging.pip_ensure(missing, requester="SyntheticCT", skip_packages=list(SLICER_OWN_PACKAGES))
            else:
                slicer.util.pip_install(" ".join(missing))

        ask = None
        if not hasattr(slicer, "packaging"):

            def ask(missing: List[str]) -> bool:
                return confirm(
                    _("SyntheticCT needs these Python packages: {p}. Install them now?").format(p=", ".join(missing)),
                    _("Install Python packages"),
                )

        return ensure_packages(packages, install=install, confirm=ask)


#
# SyntheticCTLogic
#


class SyntheticCTLogic(SyntheticCTJobLogic):
    """All MRML work of the synthesis module, without Qt: writes the inputs for the child process,
    runs it, loads and checks the result, marks it synthetic and shows it.

    Usable without the GUI (see SyntheticCTTest and Testing/slicer).
    """

    def getParameterNode(self):
        return SyntheticCTParameterNode(super().getParameterNode())

    # -- settings and catalog ----------------------------------------------------------------------
    @staticmethod
    def setCacheDirectory(path: str) -> None:
        slicer.app.userSettings().setValue(SETTINGS_CACHE_DIR, str(path or ""))

    @staticmethod
    def defaultDevice() -> str:
        """The device the user chose last (saved across scenes), else "auto"."""
        saved = str(slicer.app.userSettings().value(SETTINGS_DEVICE, "") or "")
        return saved if saved in [d.value for d in Device] else Device.AUTO.value

    @staticmethod
    def saveDefaultDevice(device: str) -> None:
        """Remember ``device`` for new scenes (call with the parameter's new value, after it changed)."""
        if device not in [d.value for d in Device]:
            raise ValueError(_("Unknown device '{d}'.").format(d=device))
        slicer.app.userSettings().setValue(SETTINGS_DEVICE, device)

    def initializeParameters(self, p) -> None:
        """A new scene's parameters: the user's usual device, and the first plausible MRI as input 1."""
        node = p.parameterNode
        if not node.GetAttribute("SyntheticCT.initialized"):
            node.SetAttribute("SyntheticCT.initialized", "1")
            p.device = Device(self.defaultDevice())
        if not p.inputVolume1:
            candidates = self.candidateVolumes(synthetic=False)
            if candidates:
                p.inputVolume1 = candidates[0]

    def models(self) -> list:
        """The catalog's models, each with its status (bundled, cached, available, ...)."""
        from SyntheticCTLib.models.catalog import list_models

        return list_models(self.cacheDirectory())

    @staticmethod
    def canonicalModelName(name: str) -> str:
        from SyntheticCTLib.models.catalog import DEFAULT_ALIAS, default_model_name

        return default_model_name() if name in ("", DEFAULT_ALIAS) else name

    @staticmethod
    def modelCard(entry) -> Optional[dict]:
        """The model card (model.json) when the model is on this computer, else None."""
        if entry is None or not entry.local_path or entry.status not in ("bundled", "cached", "outdated"):
            return None
        folder = pathlib.Path(entry.local_path)
        if not (folder / "model.json").is_file():
            return None
        from SyntheticCTLib.models.package import read_card

        return read_card(folder)

    @staticmethod
    def inputLabels(entry, card: Optional[dict]) -> List[str]:
        """What each input of the model is, e.g. ["echo 1 (TE 2.2 ms)", ...]."""
        from SyntheticCTLib.synthesis.input_check import input_labels

        if card:
            return input_labels(card)
        if entry is not None and entry.inputs:
            return input_labels({"inputs": list(entry.inputs)})
        return [_("MRI")]

    @staticmethod
    def describeModel(entry, card: Optional[dict]) -> str:
        """Rich text for the model information label."""
        card = card or {}

        def esc(text) -> str:
            return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")

        rows = [f"<b>{esc(entry.name)}</b> {esc(entry.version)}"]
        description = card.get("description") or entry.description
        if description:
            rows.append(esc(description))
        anatomy = entry.anatomy or card.get("anatomy", "")
        sequence = entry.sequence or card.get("sequence", "")
        if anatomy or sequence:
            rows.append(_("Anatomy: {a}. Sequence: {s}.").format(a=esc(anatomy or "-"), s=esc(sequence or "-")))
        if card.get("intended_use"):
            rows.append(_("Intended use: {u}").format(u=esc(card["intended_use"])))
        license_ = card.get("license") or entry.license
        if license_:
            rows.append(_("License: {l}").format(l=esc(license_)))
        if entry.status in ("available", "outdated"):
            rows.append(_("Not on this computer yet: it is downloaded, after a confirmation, when you click Apply."))
        return "<br>".join(rows)

    def clearCache(self) -> int:
        """Delete downloaded models and temporary downloads; return the bytes freed."""
        from SyntheticCTLib.models.catalog import clear_cache

        return int(clear_cache(self.cacheDirectory()))

    # -- checks ------------------------------------------------------------------------------------
    @staticmethod
    def expandInputNodes(nodes: list) -> list:
        """The volumes a model gets: a multi-echo series given as one sequence node becomes its echoes.

        A ``vtkMRMLSequenceNode`` (how Slicer's DICOM module loads a multi-echo series), or the proxy
        volume a sequence browser shows of it, is replaced by its volumes in the order of their index
        values (the echo times, when the index is numeric), else in the sequence's own order. Other
        nodes are kept as they are, so one volume per echo works too.
        """
        expanded = []
        for node in nodes:
            sequence = node if node is not None and node.IsA("vtkMRMLSequenceNode") else None
            if sequence is None and node is not None:
                for browser in slicer.util.getNodesByClass("vtkMRMLSequenceBrowserNode"):
                    master = browser.GetMasterSequenceNode()
                    if master is not None and browser.GetProxyNode(master) == node:
                        sequence = master
            if sequence is None:
                expanded.append(node)
                continue
            items = [
                (sequence.GetNthIndexValue(i), sequence.GetNthDataNode(i))
                for i in range(sequence.GetNumberOfDataNodes())
            ]
            try:
                items.sort(key=lambda item: float(item[0]))
            except ValueError:
                pass  # index values that are not numbers: the sequence's own order
            expanded.extend(data for _index, data in items)
        return expanded

    def checkInputs(self, nodes: list, card: dict) -> List[str]:
        """Plain-words warnings where the inputs differ from the model's training data (library check)."""
        from SyntheticCTLib.synthesis.input_check import check_inputs

        return check_inputs([self.sitkImage(n) for n in self.expandInputNodes(nodes)], card)

    # -- jobs --------------------------------------------------------------------------------------
    def startFetchModel(self, name: str, onEvent=None, onFinished=None, wait: bool = False):
        """Download (and verify) a catalog model in a child process; ``onFinished(result, {})``."""
        args = models_fetch_args(name, python=self.pythonExecutable())
        return self._runModelsCommand(args, onEvent, onFinished, wait)

    def startAddModel(self, source: str, sha256: Optional[str], onEvent=None, onFinished=None, wait: bool = False):
        """Add a model from a URL (with its SHA-256), a .zip file or a folder, in a child process.

        The child checks the package's architecture with torch, so call :meth:`ensureTorch` first:
        without torch this raises instead of starting a child that would fail.
        """
        if not self.torchAvailable():
            raise RuntimeError(
                _("Adding a model checks it with PyTorch, which is not installed yet: install PyTorch first.")
            )
        args = models_add_args(source, sha256=sha256, python=self.pythonExecutable())
        return self._runModelsCommand(args, onEvent, onFinished, wait)

    def _runModelsCommand(self, args: List[str], onEvent, onFinished, wait: bool):
        """A ``syntheticct models`` child: nothing to load into the scene, its work folder removed afterwards."""
        work = self.workDirectory("SyntheticCT")
        return self.runJob(args, work=str(work), importResult=dict, onEvent=onEvent, onFinished=onFinished, wait=wait)

    def startSynthesis(
        self,
        inputNodes: list,
        outputNode=None,
        *,
        model: str = "default",
        device: str = "auto",
        computeUncertainty: bool = False,
        dicomParentDirectory: Optional[str] = None,
        showBone3D: bool = False,
        onEvent: Optional[Callable] = None,
        onFinished: Optional[Callable] = None,
        wait: bool = False,
    ):
        """Run the synthesis in a child process; on success load the sCT (and uncertainty) into the scene.

        ``onFinished(result, outcome)`` gets the :class:`JobResult` and a dict with ``volume``,
        ``uncertainty``, ``message`` or ``error``. A failed or cancelled run changes nothing in the scene.
        """
        if not inputNodes or not all(inputNodes):
            raise ValueError(_("Choose a volume for every input of the model."))
        inputNodes = self.expandInputNodes(inputNodes)
        work = self.workDirectory("SyntheticCT")
        inputs = [self.writeVolume(node, work / f"input{i + 1}.nrrd") for i, node in enumerate(inputNodes)]
        sct_path = work / "sct.nrrd"
        uncertainty_path = work / "uncertainty.nrrd" if computeUncertainty else None
        dicom_dir = None
        if dicomParentDirectory:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in inputNodes[0].GetName())
            dicom_dir = pathlib.Path(dicomParentDirectory) / f"{safe}_synthetic_CT_{stamp}"
        args = synthesize_args(
            inputs,
            sct_path,
            model=model,
            device=device,
            uncertainty=uncertainty_path,
            dicom_out=dicom_dir,
            python=self.pythonExecutable(),
        )

        def load() -> dict:
            outcome = self.loadSynthesis(
                inputNodes[0], outputNode, sct_path, uncertainty_path, model=model, showBone3D=showBone3D
            )
            if dicom_dir is not None:
                outcome["message"] += " " + _("DICOM series: {d}").format(d=dicom_dir)
            return outcome

        logging.info("SyntheticCT: device requested: %s", device)
        return self.runJob(
            args,
            env=self.childEnvironment(device),
            work=str(work),
            importResult=load,
            onEvent=onEvent,
            onFinished=onFinished,
            wait=wait,
        )

    def loadSynthesis(
        self,
        inputNode,
        outputNode,
        sct_path,
        uncertainty_path=None,
        *,
        model: str = "default",
        showBone3D: bool = False,
    ) -> dict:
        """Load a synthetic CT file into the scene, check its geometry against the input, mark it synthetic."""
        device = self._deviceOf(sct_path)
        created = outputNode is None
        name = f"{inputNode.GetName()} synthetic CT"
        volume = self.readVolume(sct_path, outputNode, name=slicer.mrmlScene.GenerateUniqueName(name))
        try:
            self.checkSameGeometry(volume, inputNode)
        except Exception:
            if created:
                slicer.mrmlScene.RemoveNode(volume)
            raise
        volume.SetAndObserveTransformNodeID(inputNode.GetTransformNodeID())
        self.markSynthetic(volume, model, device)
        self.showBoneWindow(volume)
        uncertainty = None
        if uncertainty_path is not None and pathlib.Path(uncertainty_path).exists():
            uncertainty = self.readVolume(uncertainty_path, name=f"{name} uncertainty (HU)")
            self.checkSameGeometry(uncertainty, inputNode)
            uncertainty.SetAndObserveTransformNodeID(inputNode.GetTransformNodeID())
            uncertainty.SetDescription(
                _("Spread (HU) of the synthetic CT across flipped inputs. ") + NOT_FOR_DIAGNOSTIC_USE
            )
            uncertainty.SetAttribute(SYNTHETIC_ATTRIBUTE, "uncertainty")
            uncertainty.SetAttribute(OUTPUT_ATTRIBUTE, "uncertainty")
        slicer.util.setSliceViewerLayers(background=volume)
        if showBone3D:
            self.showBoneIn3D(volume)
        message = _("Synthetic CT '{n}' created").format(n=volume.GetName())
        if device:
            message += _(" on {d}.").format(d=device)
            logging.info("SyntheticCT: the model ran on %s", device)
        return {"volume": volume, "uncertainty": uncertainty, "message": message}

    @staticmethod
    def _deviceOf(path) -> str:
        """The device the child wrote into the file's header (``SyntheticCT|device``), else ""."""
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        return reader.GetMetaData("SyntheticCT|device") if reader.HasMetaDataKey("SyntheticCT|device") else ""

    @staticmethod
    def checkSameGeometry(volume, reference) -> None:
        """Raise when ``volume`` does not have the exact voxel grid of ``reference``."""
        import numpy as np

        a, b = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(a)
        reference.GetIJKToRASMatrix(b)
        dims_a = volume.GetImageData().GetDimensions()
        dims_b = reference.GetImageData().GetDimensions()
        matrix_a = slicer.util.arrayFromVTKMatrix(a)
        matrix_b = slicer.util.arrayFromVTKMatrix(b)
        if tuple(dims_a) != tuple(dims_b) or not np.allclose(matrix_a, matrix_b, atol=1e-4):
            raise RuntimeError(
                _(
                    "The synthetic CT does not have the input's geometry (size {da} vs {db}, "
                    "IJK-to-RAS\n{ma}\nvs\n{mb}); it was not loaded."
                ).format(da=tuple(dims_a), db=tuple(dims_b), ma=matrix_a.round(4), mb=matrix_b.round(4))
            )

    @staticmethod
    def markSynthetic(volume, model: str, device: str = "") -> None:
        """Name and describe the volume as synthetic, so that it is never taken for a CT."""
        if "synthetic" not in volume.GetName().lower():
            volume.SetName(f"{volume.GetName()} (synthetic CT)")
        volume.SetDescription(
            _("Synthetic CT generated from MRI by SyntheticCT, model '{m}'{d}. ").format(
                m=model, d=f", on {device}" if device else ""
            )
            + NOT_FOR_DIAGNOSTIC_USE
        )
        volume.SetAttribute(SYNTHETIC_ATTRIBUTE, "1")
        volume.SetAttribute(MODEL_ATTRIBUTE, model)

    @staticmethod
    def showBoneWindow(volume) -> None:
        displayNode = volume.GetScalarVolumeDisplayNode()
        if displayNode is None:
            volume.CreateDefaultDisplayNodes()
            displayNode = volume.GetScalarVolumeDisplayNode()
        if not slicer.modules.volumes.logic().ApplyVolumeDisplayPreset(displayNode, "CT_BONE"):
            displayNode.SetAutoWindowLevel(False)
            displayNode.SetWindowLevel(1000.0, 400.0)

    @staticmethod
    def showBoneIn3D(volume) -> None:
        """Volume rendering with the CT-Bone preset."""
        vrLogic = slicer.modules.volumerendering.logic()
        displayNode = vrLogic.GetFirstVolumeRenderingDisplayNode(volume)
        if displayNode is None:
            displayNode = vrLogic.CreateDefaultVolumeRenderingNodes(volume)
        preset = vrLogic.GetPresetByName("CT-Bone")
        if preset is not None:
            displayNode.GetVolumePropertyNode().Copy(preset)
        displayNode.SetVisibility(True)

    def exportDicom(self, volume, parentDirectory: str) -> str:
        """Write ``volume`` as a DICOM CT series (the library's exporter) into a new folder; return it."""
        from SyntheticCTLib.synthesis.dicom_export import export_dicom_series

        if not parentDirectory or str(parentDirectory) == ".":
            raise ValueError(_("Choose a folder for the DICOM series."))
        stamp = time.strftime("%Y%m%d-%H%M%S")
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in volume.GetName())
        folder = pathlib.Path(parentDirectory) / f"{safe}_{stamp}"
        export_dicom_series(self.sitkImage(volume), folder)
        return str(folder)


#
# SyntheticCTTest
#


class SyntheticCTTest(ScriptedLoadableModuleTest):
    """End-to-end tests inside Slicer: phantom data from the library, the bundled model, no download."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_catalog_lists_the_bundled_model()
        self.setUp()
        self.test_synthesis_with_the_bundled_model()
        self.setUp()
        self.test_cancel_leaves_the_scene_unchanged()

    def _skipWithoutPackages(self, logic) -> None:
        """Offline builds (the extension factory's ctest) have no torch: skip, never install."""
        if not logic.ensureTorch():
            self.skipTest("PyTorch is not installed (install the PyTorch extension and torch to run this test)")
        missing = missing_packages(SYNTHESIS_PACKAGES)
        if missing:
            self.skipTest(f"the synthesis child needs {', '.join(missing)}, which is not installed")

    def _phantomNodes(self, seed: int = 0):
        import sitkUtils

        from SyntheticCTLib.phantom import make_phantom

        phantom = make_phantom(seed, size=(64, 64, 48), spacing=2.0)
        nodes = [
            sitkUtils.PushVolumeToSlicer(image, name=f"phantom echo {i + 1}") for i, image in enumerate(phantom.mri)
        ]
        return phantom, nodes

    def test_catalog_lists_the_bundled_model(self):
        logic = SyntheticCTLogic()
        models = {m.name: m for m in logic.models()}
        name = logic.canonicalModelName("default")
        self.assertIn(name, models)
        self.assertEqual(models[name].status, "bundled")
        card = logic.modelCard(models[name])
        self.assertIsNotNone(card)
        self.assertEqual(len(logic.inputLabels(models[name], card)), len(card["inputs"]))

    def test_synthesis_with_the_bundled_model(self):
        import numpy as np

        self.delayDisplay("Synthesizing a phantom case with the bundled model")
        logic = SyntheticCTLogic()
        self._skipWithoutPackages(logic)
        phantom, nodes = self._phantomNodes()
        card = logic.modelCard({m.name: m for m in logic.models()}[logic.canonicalModelName("default")])
        self.assertEqual(logic.checkInputs(nodes, card), [])  # phantom data is what the model was trained on
        outcome = {}
        job = logic.startSynthesis(
            nodes,
            None,
            model="default",
            device="cpu",
            computeUncertainty=False,
            onFinished=lambda result, out: outcome.update(out, result=result),
            wait=True,
        )
        self.assertTrue(job.result.ok, job.result.describe())
        self.assertNotIn("error", outcome)
        sct = outcome["volume"]
        logic.checkSameGeometry(sct, nodes[0])  # raises on mismatch
        self.assertIn("synthetic", sct.GetName().lower())
        self.assertIn(NOT_FOR_DIAGNOSTIC_USE, sct.GetDescription())
        self.assertEqual(sct.GetAttribute(SYNTHETIC_ATTRIBUTE), "1")
        hu = slicer.util.arrayFromVolume(sct)
        import SimpleITK as sitk

        labels = sitk.GetArrayFromImage(phantom.labels)
        bone = sitk.GetArrayFromImage(phantom.bone_mask) > 0
        air = labels == 0
        muscle = labels == 3
        self.assertLess(float(np.median(hu[air])), -800.0)
        self.assertGreater(float(np.mean(hu[bone])), float(np.mean(hu[muscle])) + 100.0)
        self.delayDisplay("Synthesis test passed")

    def test_cancel_leaves_the_scene_unchanged(self):
        logic = SyntheticCTLogic()
        self._skipWithoutPackages(logic)
        _phantom, nodes = self._phantomNodes(seed=1)
        before = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
        finished = []
        logic.jobs.schedule = lambda ms, callback: qt.QTimer.singleShot(ms, callback)
        job = logic.startSynthesis(
            nodes, None, model="default", device="cpu", onFinished=lambda result, out: finished.append((result, out))
        )
        self.assertTrue(logic.isRunning())
        logic.cancel()
        job.wait(timeout=60, idle=slicer.app.processEvents)
        self.assertTrue(finished and finished[0][0].cancelled)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"), before)
        self.assertFalse(logic.isRunning())
