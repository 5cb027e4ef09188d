"""docs/architecture.md stays true to the code: its module map, categories, facts and the device seam."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import vllm_tuner
from vllm_tuner.devices import CPU, CUDA, KINDS, DeviceKind
from vllm_tuner.failures import NAMES

DOC = (Path(__file__).parent.parent / "docs" / "architecture.md").read_text()
PACKAGE = Path(vllm_tuner.__file__).parent


def _section(title: str) -> str:
    start = DOC.index(f"## {title}\n")
    end = DOC.find("\n## ", start + 1)
    return DOC[start : end if end != -1 else None]


def _map_names() -> set[str]:
    return set(re.findall(r"^\| `([^`]+)` \|", _section("Module map"), re.M))


def test_the_module_map_names_every_module_and_package() -> None:
    names = _map_names()
    modules = {p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    packages = {f"{p.name}/" for p in PACKAGE.iterdir() if (p / "__init__.py").exists()} - {"commands/"}
    assert modules - names == set()
    assert packages - names == set()
    assert "commands/<name>.py" in names and "commands/_common.py" in names
    inside = {n for n in names if n.endswith(".py") and "/" in n and "<" not in n}
    assert {n for n in inside if not (PACKAGE / n).is_file()} == set()  # a package's module named is there
    assert names - modules - packages - inside - {"commands/<name>.py"} == set()  # none gone


def _map_rows() -> list[tuple[str, str]]:
    """(first cell without its backticks, the rest of the row) of every row of the module map."""
    rows = re.findall(r"^\| `([^`]+)` \|(.*)$", _section("Module map"), re.M)
    return [(first, rest) for first, rest in rows]


def _named_in_map(module: str, rows: list[tuple[str, str]]) -> bool:
    """``module`` (``deploy/spec.py``) has a row of its own, or the row of a folder above it
    (``deploy/``, ``commands/<name>.py``) names it by its path inside that folder (`` `spec.py` ``)."""
    for first, rest in rows:
        if first == module:
            return True
        folder = first.split("<")[0].rsplit("/", 1)[0] + "/" if "/" in first else None
        if folder and module.startswith(folder) and f"`{module[len(folder) :]}`" in first + rest:
            return True
    return False


def test_the_module_map_names_every_module_in_every_package() -> None:
    rows = _map_rows()
    modules = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py")
    assert len(modules) > 60  # the subpackages' modules are counted, not only the top level
    assert [m for m in modules if not _named_in_map(m, rows)] == []


def test_a_module_missing_from_the_map_is_found() -> None:
    rows = [("deploy/", " the file (`spec.py`) | mixed |"), ("commands/<name>.py", " `find.py` |")]
    assert _named_in_map("deploy/spec.py", rows) and _named_in_map("commands/find.py", rows)
    assert not _named_in_map("deploy/plan.py", rows) and not _named_in_map("commands/ramp.py", rows)
    assert not _named_in_map("spec.py", rows)


def test_the_categories_are_the_declared_ones() -> None:
    text = DOC[DOC.index("A **category** is") : DOC.index("- **Facts**")]
    assert tuple(re.findall(r"`([a-z_0-9]+)`", text)) == NAMES


def test_the_facts_name_the_platform() -> None:
    text = DOC[DOC.index("- **Facts**") : DOC.index("- Environment variables")]
    keys = re.findall(r"`([a-z_0-9]+)`", text)
    assert "platform" in keys and "consumed_gib" in keys


def _seam_table() -> list[list[str]]:
    """The rows of the device seam's table: [first cell, cuda, cpu]."""
    rows = []
    for line in _section("The device seam").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`"):
            rows.append(cells)
    return rows


def _seam_rows() -> dict[str, tuple[str, str]]:
    """By the first field a row names."""
    return {first.split("`")[1]: (cuda, cpu) for first, cuda, cpu in _seam_table()}


def test_the_device_seam_names_both_kinds_and_every_field() -> None:
    assert set(KINDS) == {"cuda", "cpu"}
    named = {name for first, _, _ in _seam_table() for name in re.findall(r"`([a-z_]+)`", first)}
    assert set(DeviceKind.__dataclass_fields__) - {"name"} - named == set()


@pytest.mark.parametrize("kind, column", [(CUDA, 0), (CPU, 1)])
def test_the_device_seam_table_has_the_codes_values(kind: DeviceKind, column: int) -> None:
    rows = _seam_rows()
    assert rows["unit"][column] == kind.unit
    assert f"`{kind.visible_env}`" in rows["visible_env"][column]
    floor, ceiling = (float(x) for x in rows["util_floor"][column].split("/"))
    assert (floor, ceiling) == (kind.util_floor, kind.util_ceiling)
    start, top = (float(x) for x in rows["ramp_start"][column].split("/"))
    assert (start, top) == (kind.ramp_start, kind.ramp_ceiling)
    overhead = rows["context_overhead_bytes"][column]
    assert overhead == (f"{kind.context_overhead_bytes >> 20} MiB" if kind.context_overhead_bytes else "0")
    missing = set(re.findall(r"`([a-z0-9-]+)`", rows["missing_knobs"][column]))
    assert missing == set(kind.missing_knobs)
    for name, value in kind.base_env.items():
        assert f"{name}={value}" in rows["base_env"][column]
