"""The package's shape: subpackages meet only through public names, without cycles, and light ones stay light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "c3diff"
SUBPACKAGES = ("datasets", "io", "pp", "tl", "pl", "models", "metrics")
#: Modules at the top of the package that every subpackage may use; they import no subpackage themselves.
SHARED = ("_constants", "_geometry", "_panels", "_provenance", "_settings", "_validation", "_version")


def _imports(path: Path) -> list[str]:
    """Every ``c3diff...`` module a file imports, at module level or inside functions (``from x import y`` gives
    ``x.y`` too, since ``y`` may be a module)."""
    package = ".".join(("c3diff", *path.relative_to(SRC).with_suffix("").parts[:-1]))
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            names += [module, *(f"{module}.{alias.name}" for alias in node.names)]
    return [n for n in names if n == "c3diff" or n.startswith("c3diff.")]


def _owner(module: str) -> str:
    """The subpackage (or top-level module) a dotted ``c3diff.`` name belongs to."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _sources() -> list[tuple[Path, str]]:
    return [
        (path, _owner("c3diff." + ".".join(path.relative_to(SRC).with_suffix("").parts)))
        for path in sorted(SRC.rglob("*.py"))
    ]


def test_no_package_reaches_into_another_packages_private_modules():
    crossings = []
    for path, owner in _sources():
        for module in _imports(path):
            parts = module.split(".")
            target = _owner(module)
            if target in SUBPACKAGES and target != owner and any(p.startswith("_") for p in parts[2:]):
                crossings.append(f"{path.relative_to(SRC)} imports {module}")
    assert crossings == []


def test_subpackages_import_each_other_without_cycles_and_pl_without_tl():
    graph: dict[str, set[str]] = {sub: set() for sub in SUBPACKAGES}
    for path, owner in _sources():
        if owner in SUBPACKAGES:
            graph[owner] |= {t for t in map(_owner, _imports(path)) if t in SUBPACKAGES and t != owner}
    assert "tl" not in graph["pl"]

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})) for nxt in graph[start])

    cycles = sorted(sub for sub in SUBPACKAGES if reaches(sub, sub, {sub}))
    assert cycles == [], {sub: sorted(graph[sub]) for sub in cycles}


def test_shared_modules_import_no_subpackage():
    for name in SHARED:
        imported = {_owner(m) for m in _imports(SRC / f"{name}.py")}
        assert imported.isdisjoint(SUBPACKAGES), (name, imported)


def test_the_import_checker_sees_crossings():
    """The checks above read what they should: a private import in a function body and a relative import."""
    tl_files = dict((path.name, path) for path in (SRC / "tl").glob("*.py"))
    assert "c3diff.pp.spots_from_table" in _imports(tl_files["_evaluate.py"])  # inside a function
    assert "c3diff.metrics._maps" in _imports(SRC / "metrics" / "_spots.py")


@pytest.mark.parametrize("modules", ["c3diff.pp", "c3diff.pl", "c3diff.pp, c3diff.pl, c3diff.metrics, c3diff.io"])
def test_light_subpackages_do_not_load_torch(modules):
    code = (
        f"import sys; import {modules}; "
        "print(sorted(m for m in ('torch', 'diffusers', 'c3diff.tl', 'c3diff.models') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_patch_dataset_is_still_reachable_from_pp():
    code = (
        "import sys, c3diff.pp as pp; assert 'torch' not in sys.modules; import torch.utils.data as tud; "
        "print(issubclass(pp.PatchDataset, tud.Dataset), 'PatchDataset' in dir(pp))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True"]


def test_a_model_folder_names_its_class_from_the_registry_only(tmp_path):
    """config.json's ``_class_name`` is looked up in ``MODEL_CLASSES``; a module it names is never imported."""
    import json

    import c3diff
    from c3diff.models._hub import MODEL_CLASSES

    model = c3diff.models.build_model("tiny", genes=["EPCAM", "PTPRC"], scale=10)
    c3diff.models.save_pretrained(model, tmp_path)
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())
    assert MODEL_CLASSES[config["_class_name"]] is type(model)
    assert type(c3diff.models.from_pretrained(tmp_path)) is type(model)
    for name, module, message in [
        ("PatchDataset", "c3diff.pp", "does not have"),
        ("Popen", "subprocess", "not part of c3diff"),
    ]:
        config_path.write_text(json.dumps({**config, "_class_name": name, "_module": module}))
        with pytest.raises(ValueError, match=message):
            c3diff.models.from_pretrained(tmp_path)
