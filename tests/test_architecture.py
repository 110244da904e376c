"""docs/images/architecture.svg is what scripts/architecture.py draws from the modules now, and shared/ imports
neither front end (the map in the README cannot go stale)."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("architecture", ROOT / "scripts" / "architecture.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["architecture"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_checked_in_svg_is_what_the_script_draws_now():
    architecture = load_script()
    checked_in = (ROOT / "docs" / "images" / "architecture.svg").read_text(encoding="utf-8")
    assert checked_in == architecture.render(), "stale picture: run python scripts/architecture.py and commit it"


def test_shared_imports_neither_front_end():
    architecture = load_script()
    modules = architecture.collect()
    assert len(modules["shared"]) > 10 and all(modules[p] for p in architecture.FRONT_ENDS)
    for module in modules["shared"]:
        assert not any(architecture.uses(module, p) for p in architecture.FRONT_ENDS), module.name
    assert architecture.forbidden_imports(modules) == []


def test_the_import_parser_sees_relative_and_absolute_imports():
    import ast

    architecture = load_script()
    source = "import shared.kl\nfrom flowalign import train\nfrom .stats import X\nfrom . import run\nimport os"
    names = architecture.imported_names(ast.parse(source), "shared.advantages", is_package=False)
    expected = {"shared.kl", "flowalign", "flowalign.train", "shared.stats", "shared.stats.X", "shared", "shared.run"}
    assert names == expected  # os is not the project's; relative imports resolve against shared
    shared_module = architecture.Module("shared.advantages", "shared", names)
    assert architecture.forbidden_imports({"shared": [shared_module], "flowalign": [], "llmalign": []}) == [
        ("shared.advantages", "flowalign")
    ]
