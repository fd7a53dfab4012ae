"""Packaging: every package folder is installed under qblock.*, nothing under a bare top-level name."""
import configparser
import pathlib

import qblock

ROOT = pathlib.Path(__file__).resolve().parents[2]
TOPS = {"qblock": "qblock", "drivers": "qblock.drivers", "tools": "qblock.tools"}


def _listed_packages() -> set[str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return {p.strip() for p in cfg["options"]["packages"].split() if p.strip()}


def test_every_package_folder_is_listed_in_setup_cfg():
    """Each folder with an __init__.py maps to a package that setup.cfg lists."""
    on_disk = set()
    for top, name in TOPS.items():
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top).parts
            on_disk.add(".".join((name,) + rel))
    assert on_disk == _listed_packages()


def test_drivers_and_tools_import_under_qblock():
    """drivers/ and tools/ are importable as qblock.drivers and qblock.tools."""
    import qblock.drivers
    import qblock.tools
    assert pathlib.Path(qblock.drivers.__file__).parent.name == "drivers"
    assert pathlib.Path(qblock.tools.__file__).parent.name == "tools"
    assert qblock.__version__


def test_layers_respected():
    """No module imports across a layer boundary of the design (check_layers.py)."""
    import subprocess
    import sys
    checker = ROOT.parent / "shared" / "tools" / "check_layers.py"
    if not checker.exists():
        import pytest
        pytest.skip("the design's check_layers.py is not beside this checkout")
    r = subprocess.run([sys.executable, str(checker), str(ROOT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
