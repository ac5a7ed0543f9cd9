"""README's settings tables and .env.example's settings block are what the generator prints.

Both are generated from the Field descriptions in pipeline/config.py (``make settings-docs``): a
description changed there and not regenerated, or a row edited by hand, fails here.
"""

from __future__ import annotations

import pytest

from pipeline import settings_docs
from pipeline.config import FIELDS, GROUPS


@pytest.mark.parametrize(
    "path", [settings_docs.README, settings_docs.ENV_EXAMPLE], ids=lambda p: p.name
)
def test_generated_block_is_current(path) -> None:
    want = settings_docs.rendered()[path]
    assert path.read_text(encoding="utf-8") == want, (
        f"{path.name} is not what the generator prints: run `make settings-docs`"
    )


def test_every_setting_once_in_its_group() -> None:
    table = settings_docs.markdown()
    env = settings_docs.env_example()
    for name in FIELDS:
        assert table.count(f"| `WINNOW_{name.upper()}` |") == 1, name
        assert env.count(f"\n# WINNOW_{name.upper()}=") == 1, name
    for group, cls in GROUPS.items():
        assert f"**{cls.title}** (`settings.{group}`)" in table


def test_splice_replaces_only_between_markers() -> None:
    text = "keep\nBEGIN\nold\nEND\nkeep too\n"
    assert (
        settings_docs.splice(text, "BEGIN", "END", "new\n") == "keep\nBEGIN\nnew\nEND\nkeep too\n"
    )
    with pytest.raises(ValueError, match="marker line not found"):
        settings_docs.splice("no markers\n", "BEGIN", "END", "x\n")


def test_check_reports_a_stale_file(monkeypatch, capsys, tmp_path) -> None:
    stale = tmp_path / "README.md"
    stale.write_text(
        settings_docs.README.read_text(encoding="utf-8").replace("Milvus collection name.", "x"),
        encoding="utf-8",
    )
    monkeypatch.setattr(settings_docs, "README", stale)
    monkeypatch.setattr(settings_docs, "ROOT", tmp_path)
    env = tmp_path / ".env.example"
    env.write_text(settings_docs.ENV_EXAMPLE.read_text(encoding="utf-8"), encoding="utf-8")
    monkeypatch.setattr(settings_docs, "ENV_EXAMPLE", env)
    assert settings_docs.main(["--check"]) == 1
    assert "README.md is stale" in capsys.readouterr().err
    assert settings_docs.main(["--write"]) == 0
    assert settings_docs.main(["--check"]) == 0
    assert "| Milvus collection name. |" in stale.read_text(encoding="utf-8")
