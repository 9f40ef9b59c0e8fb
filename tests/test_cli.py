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


def test_config_prints_every_key_with_its_meaning_as_toml_that_loads_back(tmp_path, capsys):
    import dataclasses
    import tomllib

    from seedtune.shared.task.config import RunConfig, load_config

    assert main(["config", "--defaults"]) == 0
    text = capsys.readouterr().out
    written = tmp_path / "defaults.toml"
    written.write_text(text)
    assert load_config(written) == RunConfig().validate()  # the printed file is the defaults, key for key
    lines = [line for line in text.splitlines() if " = " in line]
    keys = sum(len(dataclasses.fields(getattr(RunConfig(), f.name))) if dataclasses.is_dataclass(getattr(
        RunConfig(), f.name)) else 1 for f in dataclasses.fields(RunConfig))
    assert len(lines) == keys and all("  # " in line for line in lines)  # each key, each with its meaning
    assert main(["config", "-c", "configs/trec.toml", "-s", "privacy.epsilon=1"]) == 0
    layered = tomllib.loads(capsys.readouterr().out)
    assert layered["task"]["name"] == "trec" and layered["privacy"]["epsilon"] == 1
