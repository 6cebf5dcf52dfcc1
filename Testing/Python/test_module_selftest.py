"""The module's in-Slicer self-test (``ADMAnomalyTest`` in ``ADMAnomaly.py``) run outside Slicer on
the real MRML scene of ``slicer-core``, with stand-ins for what only the Slicer application has: the
scripted-module base classes, and the SampleData module, which here loads the registered demo source
(its ``file:`` URIs, node names and load types) instead of downloading it. So the self-test's own
code, and the SampleData source it loads the demo case from, are checked in CI.

Only the self-test's fast parts run here (the demo case through SampleData, input validation); its
training and inference parts repeat what ``test_slicer_logic.py`` and ``test_slicer_cases.py`` test.
"""

from __future__ import annotations

import importlib.util
import sys
import types
import unittest
from urllib.parse import urlparse
from urllib.request import url2pathname

import pytest

import slicer  # PyPI slicer-core: missing it is an error, not a skip

from conftest import REPO

for entry in (REPO / "ADMAnomaly", REPO):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

from ADMAnomalyCore.logic import ensure_segmentation_converter_rules  # noqa: E402
from ADMAnomalyCore.standalone import StandaloneScene  # noqa: E402


class _SampleData:
    """SampleData's registration and loading of custom sources, on a standalone scene."""

    def __init__(self, environment: StandaloneScene) -> None:
        self.environment, self.sources = environment, []
        self.SampleDataLogic = types.SimpleNamespace(registerCustomSampleDataSource=self.register)

    def register(self, **source) -> None:
        self.sources.append(source)

    def downloadSamples(self, name: str) -> list:
        source = next(s for s in self.sources if s["sampleName"] == name)
        nodes = []
        for uri, node_name, kind in zip(source["uris"], source["nodeNames"], source["loadFileType"]):
            path = url2pathname(urlparse(uri).path)
            if kind == "VolumeFile":
                nodes.append(self.environment.load(path, node_name))
                continue
            assert kind == "SegmentationFile", kind
            ensure_segmentation_converter_rules()
            label = self.environment.load(path, node_name + " labelmap", labelmap=True)
            segmentation = self.environment.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", node_name)
            assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(label, segmentation)
            self.environment.scene.RemoveNode(label)
            nodes.append(segmentation)
        return nodes


@pytest.fixture
def self_test(monkeypatch):
    environment = StandaloneScene()

    class _Test(unittest.TestCase):
        def delayDisplay(self, message, *args):
            pass

    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic"):
        setattr(scripted, name, type(name, (), {"__init__": lambda self, *args: None}))
    scripted.ScriptedLoadableModuleTest = _Test
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: cls
    wrapper.Choice = wrapper.WithinRange = lambda *args: None
    sample_data = _SampleData(environment)
    monkeypatch.setitem(sys.modules, "qt", types.ModuleType("qt"))
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", scripted)
    monkeypatch.setitem(sys.modules, "slicer.parameterNodeWrapper", wrapper)
    monkeypatch.setitem(sys.modules, "SampleData", sample_data)
    monkeypatch.setattr(slicer, "modules", types.SimpleNamespace(
        volumes=types.SimpleNamespace(logic=lambda: environment.volumes)), raising=False)
    spec = importlib.util.spec_from_file_location("ADMAnomaly_self_test", REPO / "ADMAnomaly" / "ADMAnomaly.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    test = module.ADMAnomalyTest()
    test.setUp = lambda: environment.scene.Clear(0)
    test.sampleData = sample_data
    yield test
    environment.close()


def test_the_self_test_loads_the_demo_case_through_sample_data(self_test):
    self_test.setUp()
    self_test.test_DemoCaseInSampleData()
    assert [s["sampleName"] for s in self_test.sampleData.sources] == ["ADMAnomalyDemoMS"]


def test_the_self_tests_input_checks_pass_on_the_demo_case(self_test):
    self_test.setUp()
    self_test.test_InputsAndValidation()
