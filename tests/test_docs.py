"""The documentation: the site builds strictly (no broken link, no undocumented key), its configuration
reference covers every key, and the README stays a page."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_reference_documents_every_key_of_every_option():
    from dpl.config.docs import reference
    from dpl.config.store import option_keys, schemas

    text = reference()
    for group, options in schemas().items():
        for option in options:
            assert f"### `{group}={option}`" in text, (group, option)
            for key in option_keys(group, option):
                if key != "name":
                    assert f"| `{group}.{key}" in text, (group, option, key)
    from dpl.config.root import NODES, Config

    for field in dataclasses.fields(Config):
        if field.name not in schemas() and field.name != "ablation":
            assert f"`{field.name}" in text, field.name
    for node, schema in NODES.items():
        for field in dataclasses.fields(schema):
            assert f"| `{node}.{field.name}` |" in text, (node, field.name)


def test_the_reference_states_the_composed_defaults():
    from dpl.config.docs import reference
    from tests.conftest import compose_cfg

    text = reference()
    lars = text[text.index("### `optimizer=lars`"):text.index("### `optimizer=lamb`")]
    assert "| `optimizer.trust_coefficient` | `0.001` |" in lars  # the option's value, not the base schema's
    fashion = text[text.index("### `dataset=fashion_mnist`"):text.index("### `dataset=synthetic`")]
    assert "| `dataset.augment` | `false` |" in fashion  # its YAML's preset
    assert f"| `K` | `{compose_cfg(tiny=False).K}` |" in text


def test_a_key_without_documentation_fails_the_reference(monkeypatch):
    from dpl.components.optim import SgdmConfig
    from dpl.config.docs import UndocumentedKey, reference

    field = next(f for f in dataclasses.fields(SgdmConfig) if f.name == "nesterov")
    monkeypatch.setattr(field, "metadata", {})
    with pytest.raises(UndocumentedKey, match="nesterov"):
        reference()


@pytest.mark.skipif(shutil.which("mkdocs") is None, reason="mkdocs is not installed (pip install -e '.[dev]')")
def test_the_site_builds_strictly(tmp_path):
    proc = subprocess.run(["mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "site" / "configuration" / "index.html").is_file()


def test_the_readme_is_a_page_and_names_no_file_outside_the_repository():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    assert "pip install -e '.[dev]'" in readme and "python -m pytest" in readme
    for path in [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "dpl").rglob("*.py")]:
        assert "../shared" not in path.read_text(), path


def test_ruff_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    proc = subprocess.run([ruff, "check", "dpl", "tests", "hydra_plugins", "docs"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
