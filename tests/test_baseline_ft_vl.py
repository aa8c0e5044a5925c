"""`ft_vl`, the paper's name of FT-L: the same editor, the ft_l configs, the ft_l result folder."""
from __future__ import annotations

import os

import pytest

from baseline_checks import run_cli
from conftest import ROOT
from editors import canonical_editor_name, default_config_path, editor_class
from editors.baselines.ft import FTL
from utils.errors import UserError


def test_ft_vl_is_ft_l_and_reads_its_configs():
    assert editor_class("FT_VL") is FTL and editor_class("ft_l") is FTL
    assert canonical_editor_name(" Ft_Vl ") == "ft_l"
    assert default_config_path("ft_vl", "tiny-blip2") == os.path.join(ROOT, "configs", "ft_l", "tiny-blip2.yaml")
    assert not os.path.exists(os.path.join(ROOT, "configs", "ft_vl"))  # no duplicated config files
    with pytest.raises(UserError, match="ft_vl"):  # the alias is listed among the valid names
        editor_class("ft_vll")


def test_cli_ft_vl_writes_the_ft_l_result_folder(tmp_path, capsys):
    assert run_cli("ft_vl", tmp_path) == 0, capsys.readouterr().err
    assert os.path.isfile(tmp_path / "res" / "ft_l" / "tiny-blip2" / "TOY" / "sequential_edit_2" / "results.json")
    assert not (tmp_path / "res" / "ft_vl").exists()
    capsys.readouterr()
    assert run_cli("ft_l", tmp_path) == 0  # the same run under the canonical name: already evaluated
    assert "already evaluated" in capsys.readouterr().out
