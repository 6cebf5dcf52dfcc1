"""Static checks of the Slicer module that need no Slicer: the .ui file, the widgets the code looks
up, the parameter node bindings, and the extension packaging (CMake lists, catalog entries)."""

from __future__ import annotations

import ast
import json
import re
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import REPO

MODULE = REPO / "ADMAnomaly"
UI_FILE = MODULE / "Resources" / "UI" / "ADMAnomaly.ui"
MODULE_FILE = MODULE / "ADMAnomaly.py"


def ui_widgets() -> dict[str, str]:
    root = ET.parse(UI_FILE).getroot()
    names: dict[str, str] = {}
    for widget in root.iter("widget"):
        name = widget.get("name")
        assert name not in names, f"widget name {name} used twice in {UI_FILE.name}"
        names[name] = widget.get("class")
    return names


def module_tree() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"), filename=str(MODULE_FILE))


def expected_widgets() -> dict[str, str]:
    for node in module_tree().body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "EXPECTED_WIDGETS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("ADMAnomaly.py defines no EXPECTED_WIDGETS")


def parameter_fields() -> dict[str, ast.expr]:
    for node in module_tree().body:
        if isinstance(node, ast.ClassDef) and node.name == "ADMAnomalyParameterNode":
            return {item.target.id: item.annotation for item in node.body if isinstance(item, ast.AnnAssign)}
    raise AssertionError("ADMAnomaly.py defines no ADMAnomalyParameterNode")


def test_ui_file_is_valid_designer_xml():
    root = ET.parse(UI_FILE).getroot()
    assert root.tag == "ui" and root.get("version") == "4.0"
    top = root.find("widget")
    assert top is not None and top.get("class") == "qMRMLWidget" and top.get("name") == "ADMAnomaly"
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    used = set(ui_widgets().values())
    assert {c for c in used if not c.startswith("Q")} <= declared, "custom widget classes must be declared"


def test_every_widget_the_code_uses_exists_with_the_expected_class():
    expected = expected_widgets()
    widgets = ui_widgets()
    used = {node.attr for node in ast.walk(module_tree())
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui" and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"}
    assert used, "the widget looks up no self.ui.<name>"
    assert used <= set(expected), f"widgets used but not in EXPECTED_WIDGETS: {sorted(used - set(expected))}"
    for name, cls in expected.items():
        assert name in widgets, f"{name} is missing from {UI_FILE.name}"
        assert widgets[name] == cls, f"{name} is a {widgets[name]} in the .ui, the code expects {cls}"


def test_parameter_bindings_match_the_parameter_node():
    fields = parameter_fields()
    root = ET.parse(UI_FILE).getroot()
    bound = {}
    for widget in root.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                # A dynamic property (stdset="0"), as Slicer's templates write it.
                assert prop.get("stdset") == "0", f"{widget.get('name')}: SlicerParameterName needs stdset=\"0\""
                bound[widget.get("name")] = prop.findtext("string")
    assert bound, "no widget is bound to the parameter node"
    for widget, field in bound.items():
        assert field in fields, f"{widget} is bound to unknown parameter {field!r}"
    # Combo boxes bound to a Choice parameter list exactly the choices.
    for widget in root.iter("widget"):
        name = widget.get("name")
        if widget.get("class") == "QComboBox" and name in bound:
            annotation = ast.unparse(fields[bound[name]])
            choices = ast.literal_eval(re.search(r"Choice\((\[.*?\])\)", annotation).group(1))
            items = [item.findtext("property/string") for item in widget.findall("item")]
            assert items == choices, f"{name} items {items} differ from the parameter's choices {choices}"
    # The threshold is bounded (WithinRange) as the issue asks.
    assert "WithinRange" in ast.unparse(fields["threshold"]) and "WithinRange" in ast.unparse(fields["percentile"])


def ui_bindings() -> dict[str, tuple[str, str]]:
    """Widget name -> (its class, the parameter it is bound to by SlicerParameterName)."""
    bound = {}
    for widget in ET.parse(UI_FILE).getroot().iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[widget.get("name")] = (widget.get("class"), prop.findtext("string"))
    return bound


def test_paths_and_numbers_use_slicers_standard_connectors():
    """Slicer's parameterNodeWrapper connects ctkPathLineEdit <-> pathlib.Path, ctkSliderWidget and
    QDoubleSpinBox <-> bounded float, QSpinBox <-> int by SlicerParameterName alone: every such widget
    of the panel is bound that way, to a parameter of the matching type."""
    fields = {name: ast.unparse(annotation) for name, annotation in parameter_fields().items()}
    bound = ui_bindings()
    expected_type = {"ctkPathLineEdit": "pathlib.Path", "ctkSliderWidget": "float", "QDoubleSpinBox": "float",
                     "QSpinBox": "int"}
    for name, cls in ui_widgets().items():
        if cls in expected_type:
            assert name in bound, f"{name} ({cls}) is not bound to a parameter"
            annotation = fields[bound[name][1]]
            assert annotation == expected_type[cls] or annotation.startswith(f"Annotated[{expected_type[cls]}, "), (
                f"{name} ({cls}) is bound to {bound[name][1]}: {annotation}")
            if cls == "ctkSliderWidget":
                assert "WithinRange" in annotation  # the connector refuses an unbounded slider
    # No hand-written wiring of what the connectors do.
    source = MODULE_FILE.read_text(encoding="utf-8")
    assert "currentPathChanged" not in source and "currentPath =" not in source


def test_the_panel_sets_everything_logic_train_takes():
    import inspect
    import sys

    if str(MODULE) not in sys.path:
        sys.path.insert(0, str(MODULE))
    from ADMAnomalyCore.logic import ADMAnomalyCoreLogic

    fields = parameter_fields()
    bound = {parameter for _, parameter in ui_bindings().values()}
    defaults = ADMAnomalyCoreLogic.trainingDefaults("small")
    settings = set(inspect.signature(ADMAnomalyCoreLogic.train).parameters) - {"self", "progress", "shouldCancel"}
    # The panel's parameter of each setting (the others are named as the setting).
    panel = {"dataDir": "trainingFolder", "outputPath": "trainingOutput", "preset": "trainingPreset",
             "profile": "trainingProfile", "resume": "trainingResume"}
    for setting in settings:
        assert panel.get(setting, setting) in bound, f"logic.train's {setting} has no widget"
    assert set(defaults) <= settings
    # The parameters start at the default preset's values, and the preset list is the engine's.
    values = {}
    for node in module_tree().body:
        if isinstance(node, ast.ClassDef) and node.name == "ADMAnomalyParameterNode":
            values = {item.target.id: ast.literal_eval(item.value) for item in node.body
                      if isinstance(item, ast.AnnAssign) and item.value is not None
                      and item.target.id in defaults}
    assert values == defaults
    choices = ast.literal_eval(re.search(r"Choice\((\[.*?\])\)", ast.unparse(fields["trainingPreset"])).group(1))
    assert sorted(choices) == sorted(ADMAnomalyCoreLogic.trainingPresets()) and choices[0] == "small"
    choices = ast.literal_eval(re.search(r"Choice\((\[.*?\])\)", ast.unparse(fields["trainingProfile"])).group(1))
    assert choices == ADMAnomalyCoreLogic.trainingProfiles() and choices[0] == "faithful"
    # The Train button passes every setting to the background job.
    calls = [node for node in ast.walk(module_tree()) if isinstance(node, ast.Call)
             and isinstance(node.func, ast.Attribute) and node.func.attr == "startTraining"]
    assert len(calls) == 1
    passed = {keyword.arg for keyword in calls[0].keywords}
    assert settings - {"dataDir", "outputPath"} <= passed, settings - passed


def test_the_widget_uses_no_engine_internals_and_the_module_no_test_data_code():
    widget = next(node for node in module_tree().body if isinstance(node, ast.ClassDef)
                  and node.name == "ADMAnomalyWidget")
    engine_imports = [ast.unparse(node) for node in ast.walk(widget) if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert not engine_imports, engine_imports  # presets, defaults, guessing: through the logic
    source = MODULE_FILE.read_text(encoding="utf-8")
    for making_data in ("GetImageFromArray", "WriteImage", "default_rng", "meshgrid"):
        assert making_data not in source, f"ADMAnomaly.py makes test data ({making_data})"


def test_the_cases_table_has_a_column_per_shown_field():
    root = ET.parse(UI_FILE).getroot()
    table = next(w for w in root.iter("widget") if w.get("name") == "casesTable")
    headers = [column.findtext("property/string") for column in table.findall("column")]
    shown = None
    for node in module_tree().body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_CASE_COLUMNS" for t in node.targets):
            shown = ast.literal_eval(node.value)
    assert shown is not None, "ADMAnomaly.py defines no _CASE_COLUMNS"
    from ADMAnomalyLib.results import CaseRecord

    assert set(shown) <= set(CaseRecord.__dataclass_fields__)
    assert len(headers) == len(shown) and headers[0] == "Case" and headers[1] == "Status"


def test_mrml_widgets_get_the_scene():
    root = ET.parse(UI_FILE).getroot()
    connected = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
                 and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    mrml = {name for name, cls in ui_widgets().items() if cls.startswith("qMRML") and cls != "qMRMLWidget"}
    assert mrml and mrml <= connected


def test_module_file_follows_the_scripted_module_template():
    classes = {node.name: [ast.unparse(b) for b in node.bases] for node in module_tree().body
               if isinstance(node, ast.ClassDef)}
    assert "ScriptedLoadableModule" in classes["ADMAnomaly"]
    assert "ScriptedLoadableModuleWidget" in classes["ADMAnomalyWidget"]
    assert {"ADMAnomalyCoreLogic", "ScriptedLoadableModuleLogic"} <= set(classes["ADMAnomalyLogic"])
    assert "ScriptedLoadableModuleTest" in classes["ADMAnomalyTest"]
    decorators = [ast.unparse(d) for node in module_tree().body if isinstance(node, ast.ClassDef)
                  and node.name == "ADMAnomalyParameterNode" for d in node.decorator_list]
    assert decorators == ["parameterNodeWrapper"]
    # The Qt-free core must import neither Qt nor the scripted-module base classes, nor use slicer.app.
    for path in (MODULE / "ADMAnomalyCore").glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert not imported & {"qt", "ctk", "slicer.ScriptedLoadableModule", "slicer.parameterNodeWrapper"}, path.name
        uses_app = [node for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr == "app"
                    and isinstance(node.value, ast.Name) and node.value.id == "slicer"]
        assert not uses_app, f"{path.name} uses slicer.app"


# -- packaging -------------------------------------------------------------------------------------

def cmake_list(text: str, variable: str) -> list[str]:
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.DOTALL)
    assert match, f"no set({variable} ...) in CMakeLists.txt"
    return [line.split("#")[0].strip() for line in match.group(1).splitlines() if line.split("#")[0].strip()]


def test_module_cmake_lists_every_script_engine_file_and_resource():
    text = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    scripts = {s.replace("${MODULE_NAME}", "ADMAnomaly") for s in cmake_list(text, "MODULE_PYTHON_SCRIPTS")}
    on_disk = {p.relative_to(MODULE).as_posix() for p in MODULE.rglob("*.py") if "__pycache__" not in p.parts}
    assert on_disk == scripts, f"MODULE_PYTHON_SCRIPTS differs from the files: {sorted(on_disk ^ scripts)}"

    engine = set(cmake_list(text, "ADMANOMALY_ENGINE_FILES"))
    engine_on_disk = {p.name for p in (REPO / "ADMAnomalyLib").glob("*.py")}
    assert engine == engine_on_disk, (
        "ADMAnomaly/CMakeLists.txt ENGINE FILES list is out of date; add/remove: "
        f"{sorted(engine_on_disk - engine)} / {sorted(engine - engine_on_disk)}")

    resources = {r.replace("${MODULE_NAME}", "ADMAnomaly") for r in cmake_list(text, "MODULE_PYTHON_RESOURCES")}
    for resource in resources:
        assert (MODULE / resource).is_file(), f"resource {resource} does not exist"
    on_disk_resources = {p.relative_to(MODULE).as_posix() for p in (MODULE / "Resources").rglob("*") if p.is_file()}
    assert on_disk_resources == resources, f"unlisted resources: {sorted(on_disk_resources - resources)}"
    models = cmake_list(text, "ADMANOMALY_MODEL_FILES")
    assert "ADMAnomaly_default.admm" in models
    demo = REPO / "Resources" / "DemoData" / "patient26"
    assert set(cmake_list(text, "ADMANOMALY_DEMO_FILES")) == {p.name for p in demo.iterdir() if p.is_file()}
    assert "WITH_GENERIC_TESTS" in text and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


def test_extension_metadata_and_catalog_entries():
    top = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        assert re.search(rf'set\({key} "[^"]+"\)', top), key
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in top and "add_subdirectory(ADMAnomaly)" in top
    assert "Slicer_EXTENSION_GENERATE_CONFIG" in top and "Slicer_EXTENSION_CPACK" in top

    entry = json.loads((REPO / "ADMAnomaly.json").read_text(encoding="utf-8"))
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.1.json#")
    assert entry["build_dependencies"] == ["PyTorch"] and entry["category"] == "Segmentation"
    assert entry["scm_url"].startswith("https://") and entry["scm_revision"]

    s4ext = dict(line.split(" ", 1) for line in (REPO / "ADMAnomaly.s4ext").read_text(encoding="utf-8").splitlines()
                 if line.strip() and not line.startswith("#") and " " in line)
    assert s4ext["depends"].strip() == "PyTorch" and s4ext["scm"].strip() == "git"
    assert s4ext["category"].strip() == entry["category"]

    icon = (MODULE / "Resources" / "Icons" / "ADMAnomaly.png").read_bytes()
    assert icon[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", icon[16:24]) == (128, 128)
    for url in re.findall(r"raw\.githubusercontent\.com/[^/]+/[^/]+/main/(\S+?)\"", top):
        assert (REPO / url).is_file(), f"{url} (referenced by CMakeLists.txt) does not exist"


def test_readme_references_existing_screenshots():
    name = "README.md"
    text = (REPO / name).read_text(encoding="utf-8")
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert images
    for image in images:
        assert (REPO / image).is_file(), f"{image} referenced by {name} does not exist"


# -- the module file's Logic, imported with stand-ins for the Slicer-application-only modules -------

@pytest.fixture
def module_file(monkeypatch):
    """Import ADMAnomaly.py with minimal stand-ins for qt and the scripted-module base classes (which
    exist only in the Slicer application); the MRML parts are the real slicer-core ones."""
    import importlib.util
    import sys
    import types

    import slicer

    class _Base:
        def __init__(self, *args, **kwargs):
            pass

        def getParameterNode(self):
            return "parameter-node"

    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic",
                 "ScriptedLoadableModuleTest"):
        setattr(scripted, name, type(name, (_Base,), {}))
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: (lambda node: ("wrapped", node))
    wrapper.Choice = wrapper.WithinRange = lambda *args: None
    monkeypatch.setitem(sys.modules, "qt", types.ModuleType("qt"))
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", scripted)
    monkeypatch.setitem(sys.modules, "slicer.parameterNodeWrapper", wrapper)
    monkeypatch.setattr(slicer, "mrmlScene", slicer.vtkMRMLScene(), raising=False)
    spec = importlib.util.spec_from_file_location("ADMAnomaly_under_test", MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_module_logic_is_the_core_logic_with_dependency_handling(module_file, monkeypatch):
    logic = module_file.ADMAnomalyLogic()
    assert logic.getParameterNode() == ("wrapped", "parameter-node")
    with pytest.raises(module_file.errors.InputError, match="FLAIR, T1, T1c, T2"):
        logic.run(None, None, None, None)
    assert logic.ensureDependencies() is True  # everything is installed in the test environment

    engine = module_file._engine
    monkeypatch.setattr(engine, "missing_dependencies", lambda include_torch=True: ["torch>=2.1"])
    monkeypatch.setattr(engine, "torch_missing", lambda: True)
    with pytest.raises(engine.DependencyError, match="PyTorch.*Extensions Manager"):
        logic.ensureDependencies()  # no PyTorchUtils module outside Slicer: a clear message, no traceback


def test_the_demo_case_is_registered_with_sample_data(module_file, monkeypatch):
    """registerSampleData gives SampleData one source whose files are the bundled demo case, with
    the arguments of Slicer 5's SampleDataLogic.registerCustomSampleDataSource."""
    import hashlib
    import sys
    import types
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    registered = []

    class SampleDataLogic:
        @staticmethod
        def registerCustomSampleDataSource(category="Custom", sampleName=None, uris=None, fileNames=None,
                                           nodeNames=None, customDownloader=None, thumbnailFileName=None,
                                           loadFileType="VolumeFile", loadFiles=None, loadFileProperties={},
                                           checksums=None):
            registered.append(dict(category=category, sampleName=sampleName, uris=uris, fileNames=fileNames,
                                   nodeNames=nodeNames, thumbnailFileName=thumbnailFileName,
                                   loadFileType=loadFileType, checksums=checksums))

    monkeypatch.setitem(sys.modules, "SampleData", types.SimpleNamespace(SampleDataLogic=SampleDataLogic))
    module_file.registerSampleData()
    assert len(registered) == 1
    source = registered[0]
    assert source["category"] == "ADMAnomaly" and source["sampleName"]
    demo = (REPO / "Resources" / "DemoData" / "patient26").resolve()
    paths = [Path(url2pathname(urlparse(uri).path)) for uri in source["uris"]]
    assert all(uri.startswith("file:") for uri in source["uris"])
    assert paths == [demo / f"patient26_{s}.nii.gz" for s in ("flair", "t1", "t1ce", "t2", "seg")]
    for path, checksum in zip(paths, source["checksums"]):
        assert checksum == "SHA256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    assert source["loadFileType"] == ["VolumeFile"] * 4 + ["SegmentationFile"]
    assert len(set(source["fileNames"])) == len(set(source["nodeNames"])) == len(paths)
    # The nodes are named so that the panel's auto-fill finds each contrast.
    from ADMAnomalyCore.naming import guess_contrast_roles

    assert guess_contrast_roles(source["nodeNames"][:4], name_of=str) == dict(
        zip(("flair", "t1", "t1c", "t2"), source["nodeNames"][:4]))
    thumbnail = Path(source["thumbnailFileName"])
    assert thumbnail.parent == MODULE / "Resources" / "Icons" and thumbnail.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Registered when Slicer has started (SampleData exists by then), as other extensions do.
    module_class = next(node for node in module_tree().body if isinstance(node, ast.ClassDef) and node.name == "ADMAnomaly")
    assert 'slicer.app.connect("startupCompleted()", registerSampleData)' in ast.unparse(module_class).replace("'", '"')
