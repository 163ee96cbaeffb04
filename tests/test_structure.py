"""The package's shape (tests/structure.py): no import cycle, no import of a higher layer, no function-local
import of a required package, no function over MAX_FUNCTION_LINES lines."""

from __future__ import annotations

import structure

MODULES = structure.scan()


def test_no_module_imports_close_a_cycle():
    assert structure.cycles(MODULES) == []


def test_no_module_imports_a_higher_layer():
    assert structure.upward_imports(MODULES) == []


def test_only_optional_dependencies_are_imported_inside_functions():
    assert structure.forbidden_local_imports(MODULES) == []


def test_no_function_is_longer_than_the_limit():
    longest, name = structure.longest_functions(MODULES, 1)[0]
    assert longest <= structure.MAX_FUNCTION_LINES, f"{name} has {longest} lines"


def test_docstrings_point_only_to_files_the_project_has():
    outside = [f"{module.path.name}: {word}" for module in MODULES.values()
               for word in ("DESIGN.md", "THEORY.md", "STYLE.md", "../shared") if word in module.path.read_text()]
    assert outside == []
