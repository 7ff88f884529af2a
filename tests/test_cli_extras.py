"""`saisa train` / `saisa demo` without the [train] extra name the extra to install (not a bare ImportError)."""

from __future__ import annotations

import importlib.util

import pytest
import transformers.utils.import_utils as import_utils

from modeling_saisa.cli import main


@pytest.mark.parametrize("argv", [["train", "--help"], ["demo", "--output-dir", "unused"]])
def test_missing_accelerate_names_the_train_extra(monkeypatch, argv):
    monkeypatch.setattr(import_utils, "is_accelerate_available", lambda *_, **__: False)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    message = str(exit_info.value.code)
    assert "accelerate" in message and 'pip install "modeling-saisa[train]"' in message and '".[train]"' in message


def test_missing_peft_is_named(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real_find_spec(name, *a)
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert "missing: peft" in str(exit_info.value.code)


def test_installed_extra_passes_the_check(capsys):
    assert main(["train", "--help"]) == 0  # the [test] extra includes [train]'s packages
    assert "--stage" in capsys.readouterr().out
