"""SyntheticCTRegistration: align a synthetic CT (or MRI) with a CT, compare bone surfaces, check a screw path.

A thin GUI over SyntheticCTLib (its registration and comparison layers). Registration and comparison run the
library's command line (``PythonSlicer -m SyntheticCTLib register|compare ... --progress json``) in a
child process with progress and Cancel; the results come back as a transform node, model nodes
coloured by signed distance, a statistics table and a histogram. The trajectory check samples both
images along a planned screw with the library. Not for diagnostic use.
"""

import enum
import json
import logging
import os
import pathlib
import shutil
import time
from typing import Annotated, Callable, Dict, List, Optional

import qt
import slicer
import vtk
from slicer import (
    vtkMRMLLabelMapVolumeNode,
    vtkMRMLMarkupsFiducialNode,
    vtkMRMLMarkupsLineNode,
    vtkMRMLModelNode,
    vtkMRMLPlotChartNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLTableNode,
    vtkMRMLTransformNode,
)
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from SyntheticCT import OUTPUT_ATTRIBUTE, SyntheticCTJobLogic
from SyntheticCTLib import NOT_FOR_DIAGNOSTIC_USE
from SyntheticCTLib.apps.runner import JobResult, RunnerEvent, compare_args, missing_packages, register_args
from SyntheticCTLib.comparison.metric_registry import METRICS, REPORT_KEYS

FLICKER_MS = 500
DISTANCE_ARRAY = "SignedDistance_mm"
DISTANCE_COLORS = "vtkMRMLColorTableNodeFileDivergingBlueRed.txt"
DISTANCE_RANGE_MM = 2.0
SPREAD_ARRAY = "Spread_HU"
SPREAD_COLORS = "vtkMRMLColorTableNodeFileViridis.txt"
DIFFERENCE_WINDOW_HU = 400.0
COMPARISON_PACKAGES = {"matplotlib": "matplotlib>=3.5"}  # for the report's pictures; Slicer does not ship it
METRIC_ROWS = tuple((key, METRICS[key].label, METRICS[key].value_unit) for key in REPORT_KEYS)
"""(key, label, unit of the stored value) of the statistics table, from the library's one metric registry."""
UNCERTAINTY_ROWS = (
    ("surface_spread_median_hu", "Spread at the sCT bone surface, median", "HU"),
    ("surface_auroc", "Spread AUROC for bone-surface points > 1 mm off (0.5 chance)", ""),
    ("n_surface_off", "Bone-surface points > 1 mm off", "points"),
    ("hu_spearman", "Spread vs HU error, Spearman", ""),
)
"""(key, label, unit) of the statistics rows of a comparison with a spread map (its ``uncertainty`` record)."""


#
# SyntheticCTRegistration
#


class SyntheticCTRegistration(ScriptedLoadableModule):
    """Module description shown in Slicer."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Synthetic CT Registration")
        self.parent.categories = [_("Synthetic CT")]
        self.parent.dependencies = ["SyntheticCT"]  # its logic (jobs, files, scene handling) and SyntheticCTLib
        self.parent.contributors = ["SyntheticCT contributors"]
        self.parent.helpText = _(
            "Register a synthetic CT (or the MRI) to an existing CT of the same patient, check the alignment "
            "(fade, checkerboard, difference, flicker), compare the two bone surfaces point by point in millimetres, "
            "and check a planned screw trajectory along both images. <b>Not for diagnostic use.</b> "
            'See the <a href="https://github.com/SyntheticCT/SlicerSyntheticCT#readme">documentation</a>.'
        )
        self.parent.acknowledgementText = _(
            "SyntheticCT is open source (Apache-2.0). The module layout follows the 3D Slicer scripted module "
            "template; registration display follows SlicerElastix."
        )


#
# Parameters
#


class RegistrationMode(enum.Enum):
    """How the moving volume may move."""

    RIGID = "rigid"
    AFFINE = "affine"
    DEFORMABLE = "deformable"
    BONE_LOCAL = "bone-local"

    def label(self) -> str:
        return {
            "rigid": _("Rigid"),
            "affine": _("Affine"),
            "deformable": _("Deformable (B-spline)"),
            "bone-local": _("Bone-local (rigid per bone)"),
        }[self.value]


@parameterNodeWrapper
class SyntheticCTRegistrationParameterNode:
    """The module's parameters and results, saved with the scene."""

    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    mode: RegistrationMode = RegistrationMode.RIGID
    outputTransform: vtkMRMLTransformNode
    startFromCurrent: bool = True
    fade: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    checkerSquareMm: Annotated[float, WithinRange(2.0, 100.0)] = 20.0
    boneThreshold: Annotated[float, WithinRange(-200.0, 1500.0)] = 200.0
    boneLabels: vtkMRMLLabelMapVolumeNode
    dual3D: bool = False
    spreadVolume: vtkMRMLScalarVolumeNode
    showSpread: bool = False
    trajectoryLine: vtkMRMLMarkupsLineNode
    screwRadiusMm: Annotated[float, WithinRange(0.0, 5.0)] = 2.5
    trajectoryBoneThreshold: Annotated[float, WithinRange(-200.0, 1000.0)] = 150.0
    # Results (not shown in a widget)
    checkerboardVolume: vtkMRMLScalarVolumeNode
    differenceVolume: vtkMRMLScalarVolumeNode
    syntheticSurface: vtkMRMLModelNode
    referenceSurface: vtkMRMLModelNode
    statisticsTable: vtkMRMLTableNode
    perBoneTable: vtkMRMLTableNode
    histogramTable: vtkMRMLTableNode
    histogramChart: vtkMRMLPlotChartNode
    probePoints: vtkMRMLMarkupsFiducialNode
    profileTable: vtkMRMLTableNode
    profileChart: vtkMRMLPlotChartNode
    breachPoints: vtkMRMLMarkupsFiducialNode
    comparisonFolder: str = ""


#
# SyntheticCTRegistrationWidget
#


class SyntheticCTRegistrationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: Optional[SyntheticCTRegistrationLogic] = None
        self._parameterNode: Optional[SyntheticCTRegistrationParameterNode] = None
        self._parameterNodeGuiTag = None
        self._flickerTimer: Optional[qt.QTimer] = None
        self._flickerShowsMoving = False
        self._observedProbe = None
        self._runningButton = None

    # -- setup -------------------------------------------------------------------------------------
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SyntheticCTRegistration.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SyntheticCTRegistrationLogic()
        self.logic.jobs.schedule = lambda ms, callback: qt.QTimer.singleShot(ms, callback)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.registerButton.connect("clicked(bool)", self.onRegisterButton)
        self.ui.hardenButton.connect("clicked(bool)", self.onHardenButton)
        self.ui.invertButton.connect("clicked(bool)", self.onInvertButton)
        self.ui.fadeSlider.connect("valueChanged(double)", self.onFadeChanged)
        self.ui.checkerboardButton.connect("clicked(bool)", self.onCheckerboardButton)
        self.ui.differenceButton.connect("clicked(bool)", self.onDifferenceButton)
        self.ui.flickerButton.connect("toggled(bool)", self.onFlickerToggled)
        self.ui.compareButton.connect("clicked(bool)", self.onCompareButton)
        self.ui.saveReportButton.connect("clicked(bool)", self.onSaveReportButton)
        self.ui.checkTrajectoryButton.connect("clicked(bool)", self.onCheckTrajectoryButton)
        self.ui.trajectoryLineSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onTrajectoryLineChanged)
        self.ui.showSpreadCheckBox.connect("toggled(bool)", self.onShowSpreadToggled)
        self.ui.probePlaceWidget.enabled = False

        self._flickerTimer = qt.QTimer()
        self._flickerTimer.setInterval(FLICKER_MS)
        self._flickerTimer.connect("timeout()", self._flicker)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._flickerTimer is not None:
            self._flickerTimer.stop()
        if self.logic is not None:
            self.logic.cleanup()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self.ui.flickerButton.checked = False

    def onSceneStartClose(self, caller, event) -> None:
        self.ui.flickerButton.checked = False
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        parameters = self.logic.getParameterNode()
        self.logic.initializeParameters(parameters)
        self.setParameterNode(parameters)

    def setParameterNode(self, inputParameterNode: Optional[SyntheticCTRegistrationParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            self._observeProbe(self._parameterNode.probePoints)
            if self._parameterNode.statisticsTable:
                self.ui.statisticsTableView.setMRMLTableNode(self._parameterNode.statisticsTable)
            self._updateButtons()

    def _updateButtons(self, caller=None, event=None) -> None:
        p = self._parameterNode
        running = self.logic is not None and self.logic.isRunning()
        pair = bool(p and p.fixedVolume and p.movingVolume and p.fixedVolume != p.movingVolume)
        for button, idle in ((self.ui.registerButton, _("Register")), (self.ui.compareButton, _("Compute"))):
            if running and button is self._runningButton:
                button.text = _("Cancel")
                button.enabled = True
            else:
                button.text = idle
                button.enabled = pair and not running
        moving = p.movingVolume if p else None
        hasTransform = bool(moving and moving.GetParentTransformNode())
        self.ui.hardenButton.enabled = hasTransform and not running
        self.ui.invertButton.enabled = hasTransform and not running
        for button in (self.ui.checkerboardButton, self.ui.differenceButton, self.ui.flickerButton):
            button.enabled = pair
        self.ui.saveReportButton.enabled = bool(p and p.comparisonFolder and os.path.isdir(p.comparisonFolder))
        self.ui.checkTrajectoryButton.enabled = bool(p and p.trajectoryLine and moving)
        self.ui.showSpreadCheckBox.enabled = bool(p and self.logic.hasSpread(p.syntheticSurface))

    # -- jobs --------------------------------------------------------------------------------------
    def _onJobEvent(self, event: RunnerEvent, progressBar) -> None:
        if event.kind == "progress":
            progressBar.value = int(round(1000 * (event.fraction or 0.0)))
        elif event.text:
            self.ui.logTextEdit.appendPlainText(event.text)

    def _jobStarted(self, button, progressBar, what: str) -> None:
        self._runningButton = button
        progressBar.value = 0
        self.ui.logTextEdit.appendPlainText(f"--- {what} ({time.strftime('%H:%M:%S')})")
        self._updateButtons()

    def _jobEnded(self, result: JobResult, outcome: dict, progressBar, failure: str) -> None:
        self._runningButton = None
        self.ui.logTextEdit.appendPlainText(outcome.get("message") or result.describe())
        if result.ok and not outcome.get("error"):
            progressBar.value = 1000
        self._updateButtons()
        if outcome.get("error"):
            slicer.util.errorDisplay(f"{failure} {outcome['error']}")
        elif not result.ok and not result.cancelled:
            slicer.util.errorDisplay(f"{failure} {result.describe()}")

    # -- register ----------------------------------------------------------------------------------
    def onRegisterButton(self) -> None:
        if self.logic.isRunning():
            self.logic.cancel()
            return
        with slicer.util.tryWithErrorDisplay(_("Registration failed."), waitCursor=True):
            p = self._parameterNode
            bar = self.ui.registerProgressBar
            self.logic.startRegistration(
                p.fixedVolume,
                p.movingVolume,
                mode=p.mode.value,
                outputTransform=p.outputTransform,
                boneLabels=p.boneLabels if p.mode == RegistrationMode.BONE_LOCAL else None,
                boneThreshold=p.boneThreshold,
                startFromCurrent=p.startFromCurrent,
                onEvent=lambda e: self._onJobEvent(e, bar),
                onFinished=self._onRegistrationFinished,
            )
            self._jobStarted(
                self.ui.registerButton,
                bar,
                _("Registering {m} to {f}").format(m=p.movingVolume.GetName(), f=p.fixedVolume.GetName()),
            )

    def _onRegistrationFinished(self, result: JobResult, outcome: dict) -> None:
        if outcome.get("transform") is not None:
            self._parameterNode.outputTransform = outcome["transform"]
            self.logic.showFade(
                self._parameterNode.fixedVolume, self._parameterNode.movingVolume, self._parameterNode.fade
            )
        self._jobEnded(result, outcome, self.ui.registerProgressBar, _("Registration failed:"))

    def onHardenButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not harden the transform."), waitCursor=True):
            self.logic.hardenTransform(self._parameterNode.movingVolume)
            self._updateButtons()

    def onInvertButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not invert the transform."), waitCursor=True):
            p = self._parameterNode
            self.logic.invertTransform(p.movingVolume, p.fixedVolume)
            self._updateButtons()

    # -- alignment views ---------------------------------------------------------------------------
    def onFadeChanged(self, value: float) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not change the fade."), waitCursor=False):
            p = self._parameterNode
            if p and p.fixedVolume and p.movingVolume and not self.ui.flickerButton.checked:
                self.logic.showFade(p.fixedVolume, p.movingVolume, value)

    def onCheckerboardButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not make the checkerboard."), waitCursor=True):
            p = self._parameterNode
            p.checkerboardVolume = self.logic.checkerboard(
                p.fixedVolume, p.movingVolume, p.checkerSquareMm, p.checkerboardVolume
            )

    def onDifferenceButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not make the difference volume."), waitCursor=True):
            p = self._parameterNode
            p.differenceVolume = self.logic.difference(p.fixedVolume, p.movingVolume, p.differenceVolume)

    def onFlickerToggled(self, on: bool) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not flicker."), waitCursor=False):
            p = self._parameterNode
            if on and p and p.fixedVolume and p.movingVolume:
                self.logic.showFade(p.fixedVolume, p.movingVolume, 1.0)
                self._flickerShowsMoving = True
                self._flickerTimer.start()
            else:
                self._flickerTimer.stop()
                if p and p.fixedVolume and p.movingVolume:
                    self.logic.showFade(p.fixedVolume, p.movingVolume, p.fade)

    def _flicker(self) -> None:
        self._flickerShowsMoving = not self._flickerShowsMoving
        self.logic.setForegroundOpacity(1.0 if self._flickerShowsMoving else 0.0)

    # -- compare -----------------------------------------------------------------------------------
    def onCompareButton(self) -> None:
        if self.logic.isRunning():
            self.logic.cancel()
            return
        with slicer.util.tryWithErrorDisplay(_("Bone-surface comparison failed."), waitCursor=True):
            p = self._parameterNode
            if not self.logic.ensurePythonPackages(
                COMPARISON_PACKAGES, confirm=lambda text, title: slicer.util.confirmOkCancelDisplay(text, title)
            ):
                self.ui.logTextEdit.appendPlainText(_("Not started: the report's pictures need matplotlib."))
                return
            bar = self.ui.compareProgressBar
            self.logic.startComparison(
                p.fixedVolume,
                p.movingVolume,
                boneThreshold=p.boneThreshold,
                boneLabels=p.boneLabels,
                spreadVolume=p.spreadVolume,
                parameterNode=p,
                onEvent=lambda e: self._onJobEvent(e, bar),
                onFinished=self._onComparisonFinished,
            )
            self._jobStarted(self.ui.compareButton, bar, _("Comparing bone surfaces"))

    def _onComparisonFinished(self, result: JobResult, outcome: dict) -> None:
        p = self._parameterNode
        if result.ok and not outcome.get("error"):
            self.ui.statisticsTableView.setMRMLTableNode(p.statisticsTable)
            self._observeProbe(p.probePoints)
            self._showComparison()
        self._jobEnded(result, outcome, self.ui.compareProgressBar, _("Bone-surface comparison failed:"))

    def _showComparison(self) -> None:
        """The layout (Qt), then the logic places the surfaces in its views."""
        p = self._parameterNode
        layoutManager = slicer.app.layoutManager()
        if p.dual3D:
            layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutDual3DView)
            self.logic.showComparison(p, [layoutManager.threeDWidget(i).mrmlViewNode() for i in range(2)])
        else:
            if p.histogramChart is not None:
                layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutConventionalPlotView)
            self.logic.showComparison(p)
        slicer.util.resetThreeDViews()

    def _observeProbe(self, probe) -> None:
        if self._observedProbe is not None:
            self.removeObserver(
                self._observedProbe, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self._onProbeMoved
            )
            self.removeObserver(self._observedProbe, slicer.vtkMRMLMarkupsNode.PointModifiedEvent, self._onProbeMoved)
        self._observedProbe = probe
        self.ui.probePlaceWidget.enabled = probe is not None
        if probe is not None:
            self.ui.probePlaceWidget.setCurrentNode(probe)
            self.addObserver(probe, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self._onProbeMoved)
            self.addObserver(probe, slicer.vtkMRMLMarkupsNode.PointModifiedEvent, self._onProbeMoved)

    def _onProbeMoved(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None or p.probePoints is None or p.syntheticSurface is None:
            return
        try:
            self.ui.probeDistanceLabel.text = self.logic.probeDistance(p.probePoints, p.syntheticSurface)
        except Exception as e:  # an observer must not raise into VTK
            logging.exception("SyntheticCT: probe")
            self.ui.probeDistanceLabel.text = str(e)

    def onShowSpreadToggled(self, on: bool) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not recolour the bone surface."), waitCursor=True):
            p = self._parameterNode
            if p is not None and self.logic.hasSpread(p.syntheticSurface):
                self.logic.showSurfaceScalar(p.syntheticSurface, spread=on)

    def onSaveReportButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not save the report."), waitCursor=True):
            target = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Folder for the report"))
            if not target:
                return
            report = self.logic.saveReport(self._parameterNode.comparisonFolder, target)
            qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(report)))
            self.ui.logTextEdit.appendPlainText(_("Report saved: {r}").format(r=report))

    # -- trajectory --------------------------------------------------------------------------------
    def onTrajectoryLineChanged(self, node) -> None:
        self.ui.trajectoryPlaceWidget.setCurrentNode(node)

    def onCheckTrajectoryButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Trajectory check failed."), waitCursor=True):
            p = self._parameterNode
            ct = p.fixedVolume if p.fixedVolume and p.fixedVolume != p.movingVolume else None
            result = self.logic.checkTrajectory(
                p.trajectoryLine,
                p.movingVolume,
                ct,
                radiusMm=p.screwRadiusMm,
                boneThreshold=p.trajectoryBoneThreshold,
                parameterNode=p,
            )
            self.ui.trajectoryReportLabel.text = result["report"].replace("\n", "<br>")
            slicer.app.layoutManager().setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutConventionalPlotView)


#
# SyntheticCTRegistrationLogic
#


class SyntheticCTRegistrationLogic(SyntheticCTJobLogic):
    """All MRML work of the registration module, without Qt: writes the volumes for the child process,
    runs it, and shows the results in the scene (transforms, alignment views, surfaces, tables, plots).

    The job plumbing, the files and the scene-close handling come from :class:`SyntheticCTJobLogic`
    (module SyntheticCT, a declared dependency).
    """

    def __init__(self) -> None:
        SyntheticCTJobLogic.__init__(self)
        self._boneTransforms: Dict[str, Dict[int, str]] = {}  # transform node ID -> {bone label: file}

    def getParameterNode(self):
        return SyntheticCTRegistrationParameterNode(super().getParameterNode())

    def onSceneStartClose(self, caller=None, event=None) -> None:
        SyntheticCTJobLogic.onSceneStartClose(self, caller, event)
        self._boneTransforms = {}

    def initializeParameters(self, p) -> None:
        """Pick a synthetic CT as the moving volume and a CT as the fixed one, when not chosen yet."""
        if p.fixedVolume and p.movingVolume:
            return
        synthetic = self.candidateVolumes(synthetic=True)
        others = self.candidateVolumes(synthetic=False)
        others.sort(key=lambda v: "ct" in v.GetName().lower().replace("sct", ""))  # CTs last
        if not p.movingVolume and synthetic:
            p.movingVolume = synthetic[0]
        if not p.fixedVolume and others:
            p.fixedVolume = others[-1]

    # -- transforms as files -----------------------------------------------------------------------
    @staticmethod
    def _writeTransform(node, path: pathlib.Path) -> pathlib.Path:
        """A transform node as an ITK file, through an MRML storage node (Slicer writes "from parent")."""
        storage = slicer.vtkMRMLTransformStorageNode()
        storage.SetFileName(str(path))
        if not storage.WriteData(node):
            raise RuntimeError(_("Could not write the transform to {p}.").format(p=path))
        return path

    def _writeMatrix(self, matrix, path: pathlib.Path) -> pathlib.Path:
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "SyntheticCT temporary")
        try:
            node.SetMatrixTransformToParent(matrix)
            return self._writeTransform(node, path)
        finally:
            slicer.mrmlScene.RemoveNode(node)

    def _writeCurrentAlignment(self, fixedVolume, movingVolume, path: pathlib.Path) -> Optional[pathlib.Path]:
        """The moving volume's current placement relative to the fixed one, as a file; None when there is none.

        The matrix maps the moving volume's own space to the fixed volume's (the "to parent" of a
        transform node), whichever of the two carries a transform (after Invert it is the CT).
        A non-linear placement is not used.
        """
        movingParent, fixedParent = movingVolume.GetParentTransformNode(), fixedVolume.GetParentTransformNode()
        if movingParent is fixedParent or (movingParent is not None and movingParent == fixedParent):
            return None
        matrix = vtk.vtkMatrix4x4()
        if not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(movingParent, fixedParent, matrix):
            logging.info("SyntheticCT: the current placement is not linear; the registration searches.")
            return None
        return self._writeMatrix(matrix, path)

    @staticmethod
    def _isAncestorOf(transform, node) -> bool:
        """True when ``transform`` is ``node``'s parent transform or one of that transform's parents."""
        parent = node.GetParentTransformNode() if node is not None else None
        while parent is not None:
            if parent == transform:
                return True
            parent = parent.GetParentTransformNode()
        return False

    # -- register ----------------------------------------------------------------------------------
    def startRegistration(
        self,
        fixedVolume,
        movingVolume,
        *,
        mode: str = "rigid",
        outputTransform=None,
        boneLabels=None,
        boneThreshold: Optional[float] = None,
        startFromCurrent: bool = True,
        onEvent: Optional[Callable] = None,
        onFinished: Optional[Callable] = None,
        wait: bool = False,
    ):
        """Register ``movingVolume`` to ``fixedVolume`` in a child process.

        With ``startFromCurrent``, a linear transform between the two volumes' parents (a rough manual
        alignment, an earlier result, an inverted one on the CT) is the starting point
        (``--initial-transform``) instead of the search. On success the transform is loaded (into
        ``outputTransform`` when it can hold it and does not place the fixed volume, else a new node),
        put under the fixed volume's parent, and set as the moving volume's parent, so the alignment
        shows at once. ``onFinished(result, outcome)`` gets the :class:`JobResult` and
        ``{"transform", "message"}`` or ``{"error"}``. A failed or cancelled run changes nothing.
        """
        if fixedVolume is None or movingVolume is None or fixedVolume == movingVolume:
            raise ValueError(_("Choose two different volumes: the fixed CT and the moving sCT or MRI."))
        work = self.workDirectory("SyntheticCTRegistration")
        try:
            fixed = self.writeVolume(fixedVolume, work / "fixed.nrrd")
            moving = self.writeVolume(movingVolume, work / "moving.nrrd")
            labels = self.writeVolume(boneLabels, work / "bone_labels.nrrd") if boneLabels is not None else None
            initial = (
                self._writeCurrentAlignment(fixedVolume, movingVolume, work / "initial.tfm")
                if startFromCurrent
                else None
            )
            transform = work / "transform.h5" if mode == "deformable" else work / "transform.tfm"
            args = register_args(
                fixed,
                moving,
                transform,
                mode=mode,
                bone_labels=labels,
                bone_threshold=boneThreshold if mode == "bone-local" else None,
                initial_transform=initial,
                python=self.pythonExecutable(),
            )
        except Exception:
            shutil.rmtree(work, ignore_errors=True)
            raise

        def load() -> dict:
            outcome = self.loadRegistration(
                fixedVolume,
                movingVolume,
                transform,
                mode=mode,
                outputTransform=outputTransform,
                withLabels=labels is not None,
            )
            for copy in (fixed, moving, labels):  # keep only the per-bone transforms, not the volume copies
                if copy is not None and copy.exists():
                    copy.unlink()
            return outcome

        return self.runJob(
            args,
            work=str(work),
            importResult=load,
            onEvent=onEvent,
            onFinished=onFinished,
            keepWork=lambda outcome: bool(outcome.get("boneTransforms")),
            wait=wait,
        )

    def loadRegistration(
        self, fixedVolume, movingVolume, path, *, mode: str = "rigid", outputTransform=None, withLabels: bool = False
    ) -> dict:
        """Load the registration's transform file and make it the moving volume's parent (see startRegistration)."""
        path = pathlib.Path(path)
        loaded = slicer.modules.transforms.logic().AddTransform(str(path), slicer.mrmlScene)
        if loaded is None:
            raise RuntimeError(_("Slicer could not load the transform written by the registration."))
        name = f"{movingVolume.GetName()} to {fixedVolume.GetName()} ({mode})"
        node = loaded
        if outputTransform is not None and outputTransform != loaded:
            if outputTransform == fixedVolume.GetParentTransformNode() or self._isAncestorOf(
                outputTransform, fixedVolume
            ):
                logging.info(
                    "SyntheticCT: '%s' places the fixed volume (after Invert); the result goes into a new node.",
                    outputTransform.GetName(),
                )
            elif outputTransform.IsA("vtkMRMLLinearTransformNode") and loaded.IsLinear():
                matrix = vtk.vtkMatrix4x4()
                loaded.GetMatrixTransformToParent(matrix)
                outputTransform.SetMatrixTransformToParent(matrix)
                slicer.mrmlScene.RemoveNode(loaded)
                node = outputTransform
            else:
                logging.info(
                    "SyntheticCT: '%s' cannot hold a %s transform; a new node was made.",
                    outputTransform.GetName(),
                    mode,
                )
        if node is loaded:
            node.SetName(slicer.mrmlScene.GenerateUniqueName(name))
        # The result maps the moving volume into the fixed volume's own space: keep the fixed volume's parent.
        node.SetAndObserveTransformNodeID(fixedVolume.GetTransformNodeID())
        movingVolume.SetAndObserveTransformNodeID(node.GetID())
        summary = self._readSummary(path)
        message = _("Registered ({m}).").format(m=mode)
        if summary.get("metric_value") is not None:
            message += " " + _("Final metric {v:.4g}, {i} iterations, {t:.1f} s.").format(
                v=float(summary["metric_value"]), i=summary.get("iterations", "?"), t=float(summary.get("elapsed_s", 0))
            )
        message += " " + self.gradeInWords(summary.get("quality"))
        bones = {}
        if mode == "bone-local" and withLabels:
            for file in sorted(path.parent.glob(f"{path.stem}.bone*{path.suffix}")):
                label = file.name[len(path.stem) + len(".bone") : -len(path.suffix)]
                if label.isdigit():
                    bones[int(label)] = str(file)
            if bones:
                self._boneTransforms[node.GetID()] = bones
                message += " " + _("{n} per-bone transforms kept for the comparison.").format(n=len(bones))
        return {"transform": node, "message": message, "boneTransforms": bones, "quality": summary.get("quality")}

    @staticmethod
    def gradeInWords(quality) -> str:
        """The registration's grade in plain words, with what to do about it."""
        if not isinstance(quality, dict) or not quality.get("verdict"):
            return _("The registration was not graded.")
        reasons = "; ".join(str(r) for r in quality.get("reasons") or [])
        verdict = quality["verdict"]
        if verdict == "good":
            return _("The alignment is graded good.")
        if verdict == "doubtful":
            return _("The alignment is doubtful ({r}): check the overlay before trusting the comparison.").format(
                r=reasons
            )
        return _(
            "The alignment FAILED ({r}): do not use it; start from a rough manual alignment and register again."
        ).format(r=reasons)

    @staticmethod
    def _readSummary(path: pathlib.Path) -> dict:
        for candidate in (path.with_name(path.name + ".json"), path.with_suffix(".json")):
            if candidate.is_file():
                try:
                    return json.loads(candidate.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    return {}
        return {}

    @staticmethod
    def hardenTransform(volume) -> None:
        if volume is None or volume.GetParentTransformNode() is None:
            raise ValueError(_("The moving volume has no transform to harden."))
        slicer.modules.transforms.logic().hardenTransform(volume)

    @staticmethod
    def invertTransform(movingVolume, fixedVolume) -> None:
        """Invert the moving volume's transform and move it to the fixed volume (the CT moves instead)."""
        transform = movingVolume.GetParentTransformNode() if movingVolume else None
        if transform is None:
            raise ValueError(_("The moving volume has no transform to invert."))
        if fixedVolume.GetTransformNodeID() or transform.GetTransformNodeID():
            raise ValueError(_("The fixed volume (or the transform) is itself transformed; harden that first."))
        transform.Inverse()
        transform.InverseName()
        movingVolume.SetAndObserveTransformNodeID(None)
        fixedVolume.SetAndObserveTransformNodeID(transform.GetID())

    # -- alignment views ---------------------------------------------------------------------------
    @staticmethod
    def showFade(fixedVolume, movingVolume, opacity: float) -> None:
        slicer.util.setSliceViewerLayers(background=fixedVolume, foreground=movingVolume, foregroundOpacity=opacity)

    @staticmethod
    def setForegroundOpacity(opacity: float) -> None:
        for composite in slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode"):
            composite.SetForegroundOpacity(opacity)

    @staticmethod
    def resampledMovingArray(fixedVolume, movingVolume):
        """The moving volume's voxels on the fixed volume's grid, through both volumes' transforms.

        ``ResampleVolumeToReferenceVolume`` applies the input's transforms but not the reference's,
        so both go in as temporary nodes: the moving one under the transform that maps it into the
        fixed volume's own space, the reference (the fixed grid) under none.
        """
        scene = slicer.mrmlScene
        between = vtk.vtkGeneralTransform()
        slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(
            movingVolume.GetParentTransformNode(), fixedVolume.GetParentTransformNode(), between
        )
        temporary = []
        try:
            placement = scene.AddNewNodeByClass("vtkMRMLTransformNode", "SyntheticCT temporary placement")
            temporary.append(placement)
            placement.SetAndObserveTransformToParent(between)
            moving = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "SyntheticCT temporary moving")
            temporary.append(moving)
            SyntheticCTRegistrationLogic._copyGrid(movingVolume, moving, withVoxels=True)
            moving.SetAndObserveTransformNodeID(placement.GetID())
            reference = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "SyntheticCT temporary reference")
            temporary.append(reference)
            SyntheticCTRegistrationLogic._copyGrid(fixedVolume, reference, withVoxels=True)
            resampled = slicer.modules.volumes.logic().ResampleVolumeToReferenceVolume(moving, reference)
            if resampled is None:
                raise RuntimeError(_("Could not resample the moving volume onto the fixed volume."))
            temporary.append(resampled)
            return slicer.util.arrayFromVolume(resampled).copy()
        finally:
            for node in temporary:
                scene.RemoveNode(node)

    @staticmethod
    def _copyGrid(source, target, withVoxels: bool = False) -> None:
        matrix = vtk.vtkMatrix4x4()
        source.GetIJKToRASMatrix(matrix)
        target.SetIJKToRASMatrix(matrix)
        if withVoxels:
            image = vtk.vtkImageData()
            image.ShallowCopy(source.GetImageData())
            target.SetAndObserveImageData(image)

    def _outputVolume(self, node, name: str, fixedVolume, voxels):
        """``voxels`` on the fixed volume's grid and under its parent, in ``node`` (a new node when None)."""
        if node is None:
            node = slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLScalarVolumeNode", slicer.mrmlScene.GenerateUniqueName(name)
            )
        node.SetAttribute(OUTPUT_ATTRIBUTE, name)
        matrix = vtk.vtkMatrix4x4()
        fixedVolume.GetIJKToRASMatrix(matrix)
        slicer.util.updateVolumeFromArray(node, voxels)
        node.SetIJKToRASMatrix(matrix)
        node.SetAndObserveTransformNodeID(fixedVolume.GetTransformNodeID())
        if node.GetDisplayNode() is None:
            node.CreateDefaultDisplayNodes()
        return node

    def checkerboard(self, fixedVolume, movingVolume, squareMm: float, outputVolume=None):
        """A checkerboard of the fixed volume and the resampled moving volume, squares of ``squareMm``."""
        import numpy as np

        fixed = slicer.util.arrayFromVolume(fixedVolume)
        moving = self.resampledMovingArray(fixedVolume, movingVolume).astype(fixed.dtype, copy=False)
        spacing = fixedVolume.GetSpacing()  # x, y, z; the arrays are z, y, x
        size = max(float(squareMm), 1e-3)
        squares = [np.floor(np.arange(n) * spacing[2 - axis] / size).astype(int) for axis, n in enumerate(fixed.shape)]
        parity = (squares[0][:, None, None] + squares[1][None, :, None] + squares[2][None, None, :]) % 2 == 1
        output = self._outputVolume(
            outputVolume, _("Checkerboard CT / moving"), fixedVolume, np.where(parity, moving, fixed)
        )
        self._copyWindowLevel(fixedVolume, output)
        slicer.util.setSliceViewerLayers(background=output, foreground=None)
        return output

    def difference(self, fixedVolume, movingVolume, outputVolume=None):
        """The resampled moving volume minus the fixed volume (HU), on a diverging colour map (blue < 0 < red)."""
        import numpy as np

        fixed = slicer.util.arrayFromVolume(fixedVolume).astype(np.float32)
        moving = self.resampledMovingArray(fixedVolume, movingVolume).astype(np.float32)
        output = self._outputVolume(outputVolume, _("Difference moving - CT"), fixedVolume, moving - fixed)
        displayNode = output.GetScalarVolumeDisplayNode()
        displayNode.SetAndObserveColorNodeID(DISTANCE_COLORS)
        displayNode.SetAutoWindowLevel(False)
        displayNode.SetWindowLevel(DIFFERENCE_WINDOW_HU, 0.0)
        slicer.util.setSliceViewerLayers(background=output, foreground=None)
        return output

    @staticmethod
    def _copyWindowLevel(source, target) -> None:
        src = source.GetScalarVolumeDisplayNode()
        if target.GetScalarVolumeDisplayNode() is None:
            target.CreateDefaultDisplayNodes()
        dst = target.GetScalarVolumeDisplayNode()
        if src is not None and dst is not None:
            dst.SetAutoWindowLevel(False)
            dst.SetWindowLevel(src.GetWindow(), src.GetLevel())

    # -- compare -----------------------------------------------------------------------------------
    def _exportMovingToFixed(self, fixedVolume, movingVolume, folder: pathlib.Path) -> Optional[pathlib.Path]:
        """The transform from the moving volume's space to the fixed volume's, as an ITK file (None: identity)."""
        movingParent = movingVolume.GetParentTransformNode()
        fixedParent = fixedVolume.GetParentTransformNode()
        if movingParent is None and fixedParent is None:
            return None
        linear = (movingParent is None or movingParent.IsTransformToWorldLinear()) and (
            fixedParent is None or fixedParent.IsTransformToWorldLinear()
        )
        if linear:
            matrix = vtk.vtkMatrix4x4()
            slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(movingParent, fixedParent, matrix)
            return self._writeMatrix(matrix, folder / "moving_to_fixed.tfm")
        if fixedParent is not None or movingParent.GetParentTransformNode() is not None:
            raise ValueError(
                _(
                    "The moving volume has a non-linear transform and the transforms are nested; "
                    "harden the fixed volume's transform (or the outer ones) first."
                )
            )
        return self._writeTransform(movingParent, folder / "moving_to_fixed.h5")

    def startComparison(
        self,
        fixedVolume,
        movingVolume,
        *,
        boneThreshold: float = 200.0,
        boneLabels=None,
        spreadVolume=None,
        parameterNode=None,
        onEvent: Optional[Callable] = None,
        onFinished: Optional[Callable] = None,
        wait: bool = False,
    ):
        """Compare the bone surfaces of the fixed CT and the (transformed) moving sCT in a child process.

        On success: both surfaces as model nodes, a statistics table, a per-bone table, a distance
        histogram chart and a probe markup, all recorded in ``parameterNode``. With ``spreadVolume`` (the
        sCT's uncertainty map, on the sCT's grid) the sCT surface carries the spread too (``Spread_HU``),
        and the statistics its uncertainty quality. The copies of the
        volumes are removed at once; the comparison folder (the report) stays until the next
        comparison, the scene's closing or the module's cleanup.
        """
        if fixedVolume is None or movingVolume is None or fixedVolume == movingVolume:
            raise ValueError(_("Choose two different volumes: the CT and the synthetic CT."))
        parameterNode = parameterNode or self.getParameterNode()
        work = self.workDirectory("SyntheticCTComparison")
        try:
            fixed = self.writeVolume(fixedVolume, work / "reference.nrrd")
            moving = self.writeVolume(movingVolume, work / "synthetic.nrrd")
            transform = self._exportMovingToFixed(fixedVolume, movingVolume, work)
            labels = self.writeVolume(boneLabels, work / "bone_labels.nrrd") if boneLabels is not None else None
            spread = self.writeVolume(spreadVolume, work / "spread.nrrd") if spreadVolume is not None else None
            bones = None
            parent = movingVolume.GetParentTransformNode()
            if labels is not None and parent is not None and fixedVolume.GetParentTransformNode() is None:
                bones = self._boneTransforms.get(parent.GetID())
            out = work / "comparison"
            args = compare_args(
                fixed,
                moving,
                out,
                transform=transform,
                bone_threshold=boneThreshold,
                bone_labels=labels,
                bone_transforms=bones,
                uncertainty=spread,
                python=self.pythonExecutable(),
            )
        except Exception:
            shutil.rmtree(work, ignore_errors=True)
            raise

        def load() -> dict:
            outcome = self.loadComparison(out, fixedVolume, parameterNode)
            for copy in (fixed, moving, labels, spread):
                if copy is not None and copy.exists():
                    copy.unlink()
            old = parameterNode.comparisonFolder
            if old and str(pathlib.Path(old).parent) in self._keptFolders:
                shutil.rmtree(pathlib.Path(old).parent, ignore_errors=True)
                self._keptFolders.remove(str(pathlib.Path(old).parent))
            parameterNode.comparisonFolder = str(out)
            return outcome

        return self.runJob(
            args,
            work=str(work),
            importResult=load,
            onEvent=onEvent,
            onFinished=onFinished,
            keepWork=lambda outcome: True,
            wait=wait,
        )

    def loadComparison(self, out, fixedVolume, p) -> dict:
        """Load a comparison folder (metrics.json, the two surfaces) as model nodes, tables and a chart."""
        out = pathlib.Path(out)
        metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
        for old in (p.syntheticSurface, p.referenceSurface):
            if old is not None:
                slicer.mrmlScene.RemoveNode(old)
        models = slicer.modules.models.logic()
        synthetic = models.AddModel(str(out / "synthetic_surface.vtp"))
        reference = models.AddModel(str(out / "reference_surface.vtp"))
        if synthetic is None or reference is None:
            raise RuntimeError(_("Slicer could not load the bone surfaces written by the comparison."))
        synthetic.SetName(_("sCT bone surface (signed distance)"))
        reference.SetName(_("CT bone surface"))
        for model in (synthetic, reference):
            model.SetAndObserveTransformNodeID(fixedVolume.GetTransformNodeID())  # surfaces are in the CT's space
        self._styleSurfaces(synthetic, reference)
        if not self.hasSpread(synthetic):
            p.showSpread = False
        elif p.showSpread:
            self.showSurfaceScalar(synthetic, spread=True)
        p.syntheticSurface = synthetic
        p.referenceSurface = reference
        p.statisticsTable = self.statisticsTable(metrics, p.statisticsTable)
        p.perBoneTable = self.perBoneTable(metrics.get("per_bone") or [], p.perBoneTable)
        p.histogramTable, p.histogramChart = self.histogramChart(synthetic, p.histogramTable, p.histogramChart)
        if p.probePoints is None:
            probe = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", _("Distance probe"))
            probe.SetMaximumNumberOfControlPoints(1)
            p.probePoints = probe
        mean = metrics.get("surface_mean_mm")
        within = metrics.get("surface_within_1mm")
        message = _("Bone surfaces compared.")
        if mean is not None and within is not None:
            message += " " + _("Mean distance {m:.2f} mm; {w:.1f}% of the surface within 1 mm.").format(
                m=float(mean), w=100.0 * float(within)
            )
        quality = metrics.get("uncertainty") or {}
        if quality.get("reading"):
            message += " " + str(quality["reading"])
        return {"metrics": metrics, "message": message}

    @staticmethod
    def hasSpread(model) -> bool:
        """True when ``model`` (a comparison's sCT surface) carries the spread point array."""
        if model is None or model.GetPolyData() is None:
            return False
        return model.GetPolyData().GetPointData().GetArray(SPREAD_ARRAY) is not None

    @staticmethod
    def spreadRange(values) -> float:
        """The top of the spread's colour scale (HU), as the report's: the 95th percentile of the finite
        values rounded up to 1, 2 or 5 times a power of ten, at least 1 HU."""
        import math

        import numpy as np

        finite = np.asarray(values, dtype=float)
        finite = finite[np.isfinite(finite)]
        top = max(1.0, float(np.percentile(finite, 95)) if finite.size else 1.0)
        power = 10.0 ** math.floor(math.log10(top))
        return float(next(step * power for step in (1.0, 2.0, 5.0, 10.0) if top <= step * power + 1e-9))

    def showSurfaceScalar(self, model, spread: bool) -> None:
        """Colour the sCT surface ``model`` by its spread (viridis, 0 to :meth:`spreadRange` HU) or by its
        signed distance (blue-red, ±2 mm), with the legend's title and labels to match."""
        display = model.GetDisplayNode()
        if spread:
            if not self.hasSpread(model):
                raise ValueError(_("This comparison has no spread map: choose the sCT's spread and compare again."))
            top = self.spreadRange(slicer.util.arrayFromModelPointData(model, SPREAD_ARRAY))
            name, colors, low, high = SPREAD_ARRAY, SPREAD_COLORS, 0.0, top
            title, labels = _("sCT spread (HU)"), "%.1f" if top < 10 else "%.0f"
        else:
            name, colors, low, high = DISTANCE_ARRAY, DISTANCE_COLORS, -DISTANCE_RANGE_MM, DISTANCE_RANGE_MM
            title, labels = _("sCT to CT bone (mm)"), "%.1f"
        display.SetActiveScalarName(name)
        display.SetScalarVisibility(True)
        display.SetAndObserveColorNodeID(colors)
        display.SetScalarRangeFlagFromString("UseManual")
        display.SetScalarRange(low, high)
        legend = slicer.modules.colors.logic().GetColorLegendDisplayNode(model)
        if legend is not None:
            legend.SetTitleText(title)
            legend.SetLabelFormat(labels)

    @staticmethod
    def _styleSurfaces(synthetic, reference) -> None:
        display = synthetic.GetDisplayNode()
        display.SetActiveScalarName(DISTANCE_ARRAY)
        display.SetScalarVisibility(True)
        display.SetAndObserveColorNodeID(DISTANCE_COLORS)
        display.SetScalarRangeFlagFromString("UseManual")
        display.SetScalarRange(-DISTANCE_RANGE_MM, DISTANCE_RANGE_MM)
        display.SetOpacity(1.0)
        legend = slicer.modules.colors.logic().AddDefaultColorLegendDisplayNode(synthetic)
        if legend is not None:
            legend.SetTitleText(_("sCT to CT bone (mm)"))
            legend.SetLabelFormat("%.1f")
        ct = reference.GetDisplayNode()
        ct.SetScalarVisibility(False)
        ct.SetColor(0.93, 0.87, 0.75)
        ct.SetOpacity(0.35)

    def showComparison(self, p, views: Optional[list] = None) -> None:
        """The surfaces together in every 3D view, or side by side: the CT's in ``views[0]``, the sCT's (and
        its legend) in ``views[1]``, with linked cameras. The widget picks the layout and passes its view nodes.
        """
        synthetic, reference = p.syntheticSurface, p.referenceSurface
        if synthetic is None or reference is None:
            return
        displays = [synthetic.GetDisplayNode(), reference.GetDisplayNode()]
        legend = slicer.modules.colors.logic().GetColorLegendDisplayNode(synthetic)
        if views:
            reference.GetDisplayNode().SetViewNodeIDs([views[0].GetID()])
            synthetic.GetDisplayNode().SetViewNodeIDs([views[1].GetID()])
            if legend is not None:
                legend.SetViewNodeIDs([views[1].GetID()])
            reference.GetDisplayNode().SetOpacity(1.0)
            for view in views:
                view.SetLinkedControl(True)
        else:
            for display in displays + ([legend] if legend is not None else []):
                display.RemoveAllViewNodeIDs()
            reference.GetDisplayNode().SetOpacity(0.35)
            if p.histogramChart is not None:
                self.showChart(p.histogramChart)

    @staticmethod
    def showChart(chart) -> None:
        """Make ``chart`` the one the plot views show (the selection node)."""
        appLogic = slicer.app.applicationLogic()
        appLogic.GetSelectionNode().SetActivePlotChartID(chart.GetID())
        appLogic.PropagatePlotChartSelection()

    @staticmethod
    def statisticsTable(metrics: dict, table=None):
        """A table node with one row per metric: Metric, Value, Unit."""
        if table is None:
            table = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", _("Bone surface statistics"))
        table.RemoveAllColumns()
        names, keys, values, units = (
            vtk.vtkStringArray(),
            vtk.vtkStringArray(),
            vtk.vtkDoubleArray(),
            vtk.vtkStringArray(),
        )
        names.SetName("Metric")
        keys.SetName("Key")
        values.SetName("Value")
        units.SetName("Unit")
        for key, label, unit in METRIC_ROWS:
            value = metrics.get(key)
            if value is None:
                continue
            names.InsertNextValue(_(label))
            keys.InsertNextValue(key)
            values.InsertNextValue(float(value))
            units.InsertNextValue(unit)
        quality = metrics.get("uncertainty") or {}
        for key, label, unit in UNCERTAINTY_ROWS:
            value = quality.get(key)
            if value is None:
                continue
            names.InsertNextValue(_(label))
            keys.InsertNextValue(f"uncertainty.{key}")
            values.InsertNextValue(float(value))
            units.InsertNextValue(unit)
        for column in (names, values, units, keys):
            table.AddColumn(column)
        table.SetUseColumnNameAsColumnHeader(True)
        table.Modified()
        return table

    @staticmethod
    def perBoneTable(perBone: list, table=None):
        """A table node with one row per bone (whatever the library reports for each)."""
        if table is None:
            table = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", _("Per-bone surface statistics"))
        table.RemoveAllColumns()
        columns: List[str] = []
        for row in perBone:
            for key in row:
                if key not in columns and not isinstance(row[key], (dict, list)):
                    columns.append(key)
        for key in columns:
            numeric = all(isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) for r in perBone)
            array = vtk.vtkDoubleArray() if numeric else vtk.vtkStringArray()
            array.SetName(key)
            for row in perBone:
                array.InsertNextValue(float(row[key]) if numeric else str(row.get(key, "")))
            table.AddColumn(array)
        table.Modified()
        return table

    @staticmethod
    def histogramChart(model, table=None, chart=None):
        """A bar chart of the sCT surface's signed distances (0.25 mm bins, ±5 mm, outliers in the end bins)."""
        import numpy as np

        distances = slicer.util.arrayFromModelPointData(model, DISTANCE_ARRAY)
        edges = np.arange(-5.0, 5.0 + 1e-9, 0.25)
        counts, _edges = np.histogram(np.clip(distances, edges[0], edges[-1]), bins=edges)
        if table is None:
            table = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", _("Bone surface distance histogram"))
        slicer.util.updateTableFromArray(
            table,
            [0.5 * (edges[:-1] + edges[1:]), counts.astype(float)],
            columnNames=["Distance (mm)", "Surface points"],
        )
        if chart is None:
            chart = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotChartNode", _("Bone surface distances"))
            series = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", _("sCT to CT"))
            chart.AddAndObservePlotSeriesNodeID(series.GetID())
        else:
            series = chart.GetNthPlotSeriesNode(0)
        series.SetAndObserveTableNodeID(table.GetID())
        series.SetXColumnName("Distance (mm)")
        series.SetYColumnName("Surface points")
        series.SetPlotType(series.GetPlotTypeFromString("Bar"))
        series.SetColor(0.2, 0.4, 0.8)
        chart.SetTitle(_("Signed distance, sCT to CT bone surface"))
        chart.SetXAxisTitle(_("Distance (mm); positive: sCT bone outside the CT's"))
        chart.SetYAxisTitle(_("Surface points"))
        chart.SetLegendVisibility(False)
        return table, chart

    @staticmethod
    def probeDistance(probe, surface) -> str:
        """Signed distance at the surface point closest to the probe's control point, in words."""
        import numpy as np

        if probe.GetNumberOfControlPoints() < 1:
            return ""
        world = [0.0, 0.0, 0.0]
        probe.GetNthControlPointPositionWorld(0, world)
        local = list(world)
        parent = surface.GetParentTransformNode()
        if parent is not None:
            fromWorld = vtk.vtkGeneralTransform()
            parent.GetTransformFromWorld(fromWorld)
            local = list(fromWorld.TransformPoint(world))
        polyData = surface.GetPolyData()
        locator = vtk.vtkPointLocator()
        locator.SetDataSet(polyData)
        locator.BuildLocator()
        pointId = locator.FindClosestPoint(local)
        distances = slicer.util.arrayFromModelPointData(surface, DISTANCE_ARRAY)
        value = float(distances[pointId])
        gap = float(np.linalg.norm(np.array(polyData.GetPoint(pointId)) - np.array(local)))
        side = _("outside") if value > 0 else _("inside")
        text = _("{d:+.2f} mm: the sCT bone surface lies {side} the CT's here").format(d=value, side=side)
        if gap > 1.0:
            text += " " + _("(nearest surface point {g:.1f} mm from the click)").format(g=gap)
        if polyData.GetPointData().GetArray(SPREAD_ARRAY) is not None:
            spread = float(slicer.util.arrayFromModelPointData(surface, SPREAD_ARRAY)[pointId])
            text += "; " + _("sCT spread {s:.0f} HU").format(s=spread)
        probe.SetNthControlPointLabel(0, f"{value:+.2f} mm")
        probe.SetNthControlPointDescription(0, text)
        return text

    def saveReport(self, comparisonFolder: str, targetFolder: str) -> pathlib.Path:
        """Copy the comparison's HTML report (and its pictures and data) into a new folder; return report.html."""
        source = pathlib.Path(comparisonFolder or "")
        if not (source / "report.html").is_file():
            raise ValueError(_("There is no comparison report yet: compute the comparison first."))
        target = pathlib.Path(targetFolder) / f"SyntheticCT_report_{time.strftime('%Y%m%d-%H%M%S')}"
        shutil.copytree(source, target)
        return target / "report.html"

    # -- trajectory --------------------------------------------------------------------------------
    @staticmethod
    def _localLps(volume, worldRas) -> tuple:
        """A world (RAS) point in the volume's own space, in ITK's LPS convention."""
        from SyntheticCTLib.comparison.trajectory import ras_to_lps

        point = list(worldRas)
        parent = volume.GetParentTransformNode()
        if parent is not None:
            fromWorld = vtk.vtkGeneralTransform()
            parent.GetTransformFromWorld(fromWorld)
            point = list(fromWorld.TransformPoint(point))
        return ras_to_lps(point)

    def checkTrajectory(
        self,
        lineNode,
        syntheticVolume,
        ctVolume=None,
        *,
        radiusMm: float = 2.5,
        boneThreshold: float = 150.0,
        parameterNode=None,
    ) -> dict:
        """Sample the sCT (and the CT) along the planned screw; plot the HU profiles and report breaches."""
        import numpy as np

        from SyntheticCTLib.comparison.trajectory import breach_report, compare_profiles, find_breaches, sample_profile

        if lineNode is None or lineNode.GetNumberOfControlPoints() < 2:
            raise ValueError(_("Place the planned screw as a line with two points (entry, then tip)."))
        if syntheticVolume is None:
            raise ValueError(_("Choose the synthetic CT (the moving volume)."))
        p = parameterNode or self.getParameterNode()
        start, end = [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]
        lineNode.GetNthControlPointPositionWorld(0, start)
        lineNode.GetNthControlPointPositionWorld(1, end)
        volumes = [("sCT", syntheticVolume)] + ([("CT", ctVolume)] if ctVolume is not None else [])
        profiles = {}
        for name, volume in volumes:
            image = self.sitkImage(volume)
            kwargs = {"n_steps": len(profiles["sCT"].distance_mm)} if profiles else {}
            profiles[name] = sample_profile(
                image, self._localLps(volume, start), self._localLps(volume, end), radius_mm=radiusMm, **kwargs
            )
        lines = []
        breaches = {}
        for name, profile in profiles.items():
            breaches[name] = find_breaches(profile, bone_threshold=boneThreshold)
            lines.append(breach_report(profile, breaches[name], name=name))
        comparison = None
        if "CT" in profiles:
            comparison = compare_profiles(profiles["sCT"], profiles["CT"], bone_threshold=boneThreshold)
            lines.append(comparison.describe())
        report = "\n".join(lines) + "\n" + NOT_FOR_DIAGNOSTIC_USE

        # Table and chart of the profiles
        columns = [profiles["sCT"].distance_mm]
        names = ["Distance (mm)"]
        for name, profile in profiles.items():
            columns += [profile.mean, profile.min, profile.max]
            names += [f"{name} mean (HU)", f"{name} min (HU)", f"{name} max (HU)"]
        if p.profileTable is None:
            p.profileTable = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", _("Trajectory HU profile"))
        slicer.util.updateTableFromArray(
            p.profileTable, [np.nan_to_num(c, nan=-1024.0) for c in columns], columnNames=names
        )
        if p.profileChart is None:
            p.profileChart = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotChartNode", _("Trajectory HU profile"))
        chart = p.profileChart
        chart.RemoveAllPlotSeriesNodeIDs()
        colors = {"sCT": (0.85, 0.3, 0.1), "CT": (0.1, 0.3, 0.85)}
        for name in profiles:
            for statistic, style in (("mean", "solid"), ("min", "dash")):
                series = slicer.mrmlScene.GetFirstNodeByName(f"{name} {statistic} along the trajectory")
                if series is None:
                    series = slicer.mrmlScene.AddNewNodeByClass(
                        "vtkMRMLPlotSeriesNode", f"{name} {statistic} along the trajectory"
                    )
                series.SetAndObserveTableNodeID(p.profileTable.GetID())
                series.SetXColumnName("Distance (mm)")
                series.SetYColumnName(f"{name} {statistic} (HU)")
                series.SetPlotType(series.GetPlotTypeFromString("Line"))
                series.SetLineStyle(series.GetLineStyleFromString(style))
                series.SetMarkerStyle(series.GetMarkerStyleFromString("none"))
                series.SetColor(*colors[name])
                chart.AddAndObservePlotSeriesNodeID(series.GetID())
        chart.SetTitle(_("HU along the planned screw (radius {r:.1f} mm)").format(r=radiusMm))
        chart.SetXAxisTitle(_("Distance from the entry (mm)"))
        chart.SetYAxisTitle("HU")

        # Breach points as markups, on the world line
        if p.breachPoints is None:
            p.breachPoints = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", _("Possible breaches"))
        points = p.breachPoints
        points.RemoveAllControlPoints()
        startArr, endArr = np.array(start), np.array(end)
        for name, found in breaches.items():
            length = profiles[name].length_mm
            for breach in found:
                position = startArr + (endArr - startArr) * (breach.start_mm / max(length, 1e-9))
                index = points.AddControlPointWorld(vtk.vtkVector3d(*position))
                points.SetNthControlPointLabel(index, f"{name} {breach.start_mm:.1f} mm")
                points.SetNthControlPointDescription(index, breach.describe())
                points.SetNthControlPointLocked(index, True)

        self.showChart(chart)
        return {"report": report, "profiles": profiles, "breaches": breaches, "comparison": comparison}


#
# SyntheticCTRegistrationTest
#


class SyntheticCTRegistrationTest(ScriptedLoadableModuleTest):
    """End-to-end tests inside Slicer on the library's phantom: known move, known distances."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_register_a_moved_copy()
        self.setUp()
        self.test_compare_identical_and_moved()
        self.setUp()
        self.test_difference_and_trajectory_of_identical_volumes()

    @staticmethod
    def _phantomCT(seed: int = 0):
        import sitkUtils

        from SyntheticCTLib.phantom import make_phantom

        phantom = make_phantom(seed, size=(64, 64, 48), spacing=2.0)
        return phantom, sitkUtils.PushVolumeToSlicer(phantom.ct, name="phantom CT")

    @staticmethod
    def _movedCopy(phantom):
        """The CT resampled through a known rigid move S: moved(y) = ct(S(y)); registration must find S^-1."""
        import SimpleITK as sitk
        import sitkUtils

        move = sitk.Euler3DTransform()
        move.SetCenter(phantom.ct.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in phantom.ct.GetSize()]))
        move.SetRotation(0.0, 0.0, 0.08)  # about 4.6 degrees
        move.SetTranslation((4.0, -3.0, 2.0))
        moved = sitk.Resample(phantom.ct, phantom.ct, move, sitk.sitkLinear, -1024.0)
        return move, sitkUtils.PushVolumeToSlicer(moved, name="phantom CT moved")

    def _registered(self, fixed, moving):
        logic = SyntheticCTRegistrationLogic()
        outcome = {}
        job = logic.startRegistration(
            fixed, moving, mode="rigid", onFinished=lambda result, out: outcome.update(out), wait=True
        )
        self.assertTrue(job.result.ok, job.result.describe())
        self.assertNotIn("error", outcome)
        return logic, outcome["transform"]

    def test_register_a_moved_copy(self):
        import numpy as np
        import SimpleITK as sitk

        self.delayDisplay("Registering a moved copy of the phantom CT")
        phantom, fixed = self._phantomCT()
        move, moving = self._movedCopy(phantom)
        _logic, transform = self._registered(fixed, moving)
        self.assertEqual(moving.GetTransformNodeID(), transform.GetID())
        # Slicer's transform maps moving points to fixed points (RAS). In LPS it must equal the move S.
        matrix = vtk.vtkMatrix4x4()
        transform.GetMatrixTransformToParent(matrix)
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        toFixed = flip @ slicer.util.arrayFromVTKMatrix(matrix) @ flip
        bone = np.argwhere(sitk.GetArrayFromImage(phantom.bone_mask) > 0)[::50]
        errors = []
        for z, y, x in bone:
            point = np.array(phantom.ct.TransformIndexToPhysicalPoint([int(x), int(y), int(z)]))
            expected = np.array(move.TransformPoint(point.tolist()))
            found = (toFixed @ np.append(point, 1.0))[:3]
            errors.append(np.linalg.norm(found - expected))
        self.assertLess(float(np.mean(errors)), 1.0, f"target registration error {np.mean(errors):.2f} mm")
        self.delayDisplay("Registration test passed")

    def _compare(self, logic, fixed, moving):
        missing = missing_packages(COMPARISON_PACKAGES)
        if missing:
            self.skipTest(f"the comparison child needs {', '.join(missing)}, which is not installed")
        p = logic.getParameterNode()
        outcome = {}
        job = logic.startComparison(
            fixed,
            moving,
            boneThreshold=200.0,
            parameterNode=p,
            onFinished=lambda result, out: outcome.update(out),
            wait=True,
        )
        self.assertTrue(job.result.ok, job.result.describe())
        self.assertNotIn("error", outcome)
        values = slicer.util.arrayFromTableColumn(p.statisticsTable, "Value")
        keys = [p.statisticsTable.GetCellText(i, 3) for i in range(p.statisticsTable.GetNumberOfRows())]
        return p, dict(zip(keys, (float(v) for v in values)))

    def test_compare_identical_and_moved(self):
        import sitkUtils

        self.delayDisplay("Comparing the phantom CT with itself and with a registered moved copy")
        phantom, fixed = self._phantomCT(seed=1)
        copy = sitkUtils.PushVolumeToSlicer(phantom.ct, name="phantom CT copy")
        logic = SyntheticCTRegistrationLogic()
        p, table = self._compare(logic, fixed, copy)
        # Identical images: the truth is exact.
        self.assertAlmostEqual(table["surface_mean_mm"], 0.0, places=6)
        self.assertAlmostEqual(table["surface_max_mm"], 0.0, places=6)
        self.assertAlmostEqual(table["surface_within_1mm"], 1.0, places=9)
        self.assertAlmostEqual(table["bone_dice"], 1.0, places=9)
        self.assertAlmostEqual(table["mae_hu"], 0.0, places=6)
        self.assertIsNotNone(p.syntheticSurface)
        distances = slicer.util.arrayFromModelPointData(p.syntheticSurface, DISTANCE_ARRAY)
        self.assertEqual(float(abs(distances).max()), 0.0)
        # A moved copy, registered: the surfaces agree to within a fraction of the 2 mm voxels.
        move, moving = self._movedCopy(phantom)
        self._registered(fixed, moving)
        p, table = self._compare(logic, fixed, moving)
        self.assertLess(table["surface_mean_mm"], 0.5)
        self.assertGreater(table["surface_within_1mm"], 0.9)
        self.assertGreater(table["bone_dice"], 0.9)
        report = logic.saveReport(p.comparisonFolder, slicer.util.tempDirectory("SyntheticCTReport"))
        self.assertTrue(report.is_file())
        logic.cleanup()
        self.delayDisplay("Comparison test passed")

    def test_difference_and_trajectory_of_identical_volumes(self):
        import numpy as np
        import sitkUtils

        phantom, fixed = self._phantomCT(seed=2)
        copy = sitkUtils.PushVolumeToSlicer(phantom.ct, name="phantom CT copy")
        logic = SyntheticCTRegistrationLogic()
        difference = logic.difference(fixed, copy)
        self.assertEqual(float(np.abs(slicer.util.arrayFromVolume(difference)).max()), 0.0)
        checker = logic.checkerboard(fixed, copy, 20.0)
        np.testing.assert_allclose(slicer.util.arrayFromVolume(checker), slicer.util.arrayFromVolume(fixed), atol=1e-3)
        # A line through the middle of the volume, from front to back
        bounds = [0.0] * 6
        fixed.GetRASBounds(bounds)
        centre = [(bounds[0] + bounds[1]) / 2, (bounds[2] + bounds[3]) / 2, (bounds[4] + bounds[5]) / 2]
        line = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsLineNode", "Screw")
        line.AddControlPointWorld(vtk.vtkVector3d(centre[0], bounds[2] + 4.0, centre[2]))
        line.AddControlPointWorld(vtk.vtkVector3d(centre[0], bounds[3] - 4.0, centre[2]))
        result = logic.checkTrajectory(line, copy, fixed, radiusMm=2.0, boneThreshold=150.0)
        self.assertAlmostEqual(result["comparison"].mae_hu, 0.0, places=6)
        self.assertTrue(result["comparison"].breaches_agree)
        self.assertIn(NOT_FOR_DIAGNOSTIC_USE, result["report"])
