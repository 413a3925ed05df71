"""Static checks of launch/internvl.launch.py and config/internvl.yaml (launch is not installable
here, so the launch file runs against small stand-ins of the launch modules)."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import yaml

from internvl_ros.ros import params

PKG = Path(__file__).resolve().parents[1]
LAUNCH = PKG / "launch" / "internvl.launch.py"
CONFIG = PKG / "config" / "internvl.yaml"


class Recorder:
    """Stands in for every launch class: remembers its arguments."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


class LaunchConfigurationStub(Recorder):
    """LaunchConfiguration(name).perform(context) reads the context's launch arguments."""

    def perform(self, context):
        return context.launch_configurations[self.args[0]]


def _stub_modules(share: str) -> dict[str, types.ModuleType]:
    mods = {}
    for name in [
        "launch",
        "launch.actions",
        "launch.conditions",
        "launch.substitutions",
        "launch_ros",
        "launch_ros.actions",
        "ament_index_python",
        "ament_index_python.packages",
    ]:
        mods[name] = types.ModuleType(name)
    kinds = {
        "launch": ["LaunchDescription"],
        "launch.actions": ["DeclareLaunchArgument", "SetEnvironmentVariable", "OpaqueFunction"],
        "launch.conditions": ["IfCondition"],
        "launch_ros.actions": ["Node"],
    }
    for mod, classes in kinds.items():
        for cls in classes:
            setattr(mods[mod], cls, type(cls, (Recorder,), {}))
    mods["launch.substitutions"].LaunchConfiguration = LaunchConfigurationStub
    mods["ament_index_python.packages"].get_package_share_directory = lambda pkg: f"{share}/{pkg}"
    return mods


@pytest.fixture
def description(monkeypatch):
    for name, mod in _stub_modules("/opt/share").items():
        monkeypatch.setitem(sys.modules, name, mod)
    ns: dict = {"__name__": "internvl_launch", "__file__": str(LAUNCH)}
    exec(compile(LAUNCH.read_text(), str(LAUNCH), "exec"), ns)
    return ns["generate_launch_description"]()


def _by_type(description, name):
    return [a for a in description.args[0] if type(a).__name__ == name]


def _nodes(description, **arguments) -> list:
    """Run the launch file's OpaqueFunction(s) with these launch arguments (defaults first)."""
    declared = {a.args[0]: a.kwargs["default_value"]
                for a in _by_type(description, "DeclareLaunchArgument")}
    context = types.SimpleNamespace(launch_configurations={**declared, **arguments})
    out = _by_type(description, "Node")
    for f in _by_type(description, "OpaqueFunction"):
        out += f.kwargs["function"](context)
    return out


def test_launch_starts_our_executable_with_params_namespace_and_remap(description):
    (node,) = _nodes(description)
    kw = node.kwargs
    assert kw["package"] == "internvl_ros"
    assert kw["executable"] == "internvl_node"
    assert kw["name"] == "internvl"
    assert kw["namespace"].args == ("namespace",)
    assert [p.args for p in kw["parameters"]] == [("params_file",)]
    ((src, dst),) = kw["remappings"]
    assert src == "image" and dst.args == ("image_topic",)

    declared = {a.args[0]: a.kwargs for a in _by_type(description, "DeclareLaunchArgument")}
    assert {"params_file", "namespace", "image_topic", "model_dir"} <= set(declared)
    assert declared["params_file"]["default_value"] == (
        "/opt/share/internvl_ros/config/internvl.yaml"
    )
    assert declared["model_dir"]["default_value"] == ""
    for env in _by_type(description, "SetEnvironmentVariable"):  # test_board_fastdds.py
        assert env.args[1].endswith("config/fastdds_large_data.xml")
    assert (PKG / "config" / "fastdds_large_data.xml").is_file()


def test_model_dir_argument_overrides_the_params_file_only_when_given(description):
    """The shipped params file has model_dir: "" (a plain launch must be able to set it)."""
    (node,) = _nodes(description, model_dir="/models/internvl")
    params_file, override = node.kwargs["parameters"]
    assert params_file.args == ("params_file",) and override == {"model_dir": "/models/internvl"}
    (node,) = _nodes(description)  # empty: the params file's value stands
    assert [p.args for p in node.kwargs["parameters"]] == [("params_file",)]
    assert _yaml_params()["model_dir"] == ""


def test_executable_is_a_registered_console_script():
    setup_py = (PKG / "setup.py").read_text()
    assert re.search(r"['\"]internvl_node\s*=\s*internvl_ros\.ros\.main:main['\"]", setup_py)
    assert re.search(r"share/.*config", setup_py) and re.search(r"share/.*launch", setup_py)
    from internvl_ros.ros import main

    assert callable(main.main)


def test_autostart_argument_sets_the_parameter_only_when_given(description):
    declared = {a.args[0]: a.kwargs for a in _by_type(description, "DeclareLaunchArgument")}
    assert declared["autostart"]["default_value"] == ""  # the params file decides (true)
    (node,) = _nodes(description)
    assert [p.args for p in node.kwargs["parameters"]] == [("params_file",)]
    assert _yaml_params()["autostart"] is True
    for text, value in (("false", False), ("False", False), ("true", True)):
        (node,) = _nodes(description, autostart=text)
        assert node.kwargs["parameters"][1:] == [{"autostart": value}]


def _yaml_params() -> dict:
    doc = yaml.safe_load(CONFIG.read_text())
    ((key, body),) = doc.items()
    assert key in ("/**", "internvl", "/internvl", "/**/internvl")
    return body["ros__parameters"]


def test_every_yaml_key_is_declared_with_the_same_default_and_type():
    values = _yaml_params()
    undeclared = set(values) - set(params.PARAM_NAMES)
    assert not undeclared, f"config/internvl.yaml has keys the node does not declare: {undeclared}"
    missing = set(params.PARAM_NAMES) - set(values)
    assert not missing, f"config/internvl.yaml does not document: {missing}"
    for name, value in values.items():
        p = params.BY_NAME[name]
        assert type(value) is type(p.default), f"{name}: yaml {value!r} vs default {p.default!r}"
        assert value == p.default, f"{name}: yaml {value!r} vs declared default {p.default!r}"
        assert p.check(value) is None


def _yaml_comments() -> dict[str, str]:
    """{parameter: the comment lines just above it in config/internvl.yaml}."""
    out, block = {}, []
    for line in CONFIG.read_text().splitlines():
        m = re.match(r"^\s{4}(\w+):", line)
        if line.strip().startswith("#"):
            block.append(line)
        elif m:
            out[m.group(1)], block = " ".join(block), []
        else:
            block = []
    return out


def test_yaml_documents_each_parameter_with_a_comment():
    lines = CONFIG.read_text().splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^\s{4}(\w+):", line)
        if m:
            assert lines[i - 1].strip().startswith("#"), f"no comment above {m.group(1)}"


def test_descriptors_have_descriptions_and_ranges():
    """The descriptor carries the table's range (what rclpy enforces), and the range the YAML's
    comment promises is that range."""
    comments = _yaml_comments()
    for p in params.PARAMS:
        d = params.descriptor(p)
        assert d.name == p.name and len(d.description) > 20
        assert d.read_only == p.read_only
        if isinstance(p.default, bool):
            assert d.type == 1 and not d.integer_range  # PARAMETER_BOOL
        elif isinstance(p.default, (int, float)):
            (r,) = d.integer_range if isinstance(p.default, int) else d.floating_point_range
            assert (r.from_value, r.to_value) == (p.lo, p.hi), p.name
            promised = re.search(r"\[(-?[0-9.]+), (-?[0-9.]+)\]", comments[p.name])
            if promised:
                assert (float(promised[1]), float(promised[2])) == (p.lo, p.hi), p.name
        else:
            assert d.additional_constraints
    ro = {p.name for p in params.PARAMS if p.read_only}
    assert {"model_dir", "backend", "provider", "image_transport"} <= ro
    live = {p.name for p in params.PARAMS if not p.read_only}
    assert {"max_new_tokens", "temperature", "top_k", "top_p", "default_prompt"} <= live


def test_docs_table_lists_every_parameter():
    doc = (PKG.parent / "docs" / "NODE.md").read_text()
    for name in params.PARAM_NAMES:
        assert f"`{name}`" in doc, f"docs/NODE.md does not document {name}"
