"""The command line for users: what it does, and the closest command, option or config key for a typo."""

from __future__ import annotations

import pytest

from seedtune.cli import main


@pytest.mark.parametrize("argv, suggestion", [
    (["trian"], "did you mean 'train'?"),
    (["train", "--ot", "x"], "did you mean '--out'?"),
    (["verfy", "ledger.sqlite"], "did you mean 'verify'?"),
])
def test_a_mistyped_command_or_option_exits_2_with_the_closest(argv, suggestion, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and suggestion in capsys.readouterr().err


def test_a_mistyped_config_key_names_the_closest(tmp_path, capsys):
    assert main(["train", "-s", "privacy.epsilom=1", "--out", str(tmp_path / "run")]) == 2
    assert "did you mean 'privacy.epsilon'?" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_top_level_help_says_what_each_command_does_for_a_user(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "finetuning" in out and all(cmd in out for cmd in ("train", "replay", "verify", "export-onnx"))
    assert "import their implementation lazily" not in out  # the developers' note it used to print
