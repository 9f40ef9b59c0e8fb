import tomllib
from pathlib import Path

import pytest
from flwr.common.config import flatten_dict, parse_config_args

from seedtune.shared.task.config import ConfigError, config_from_flower, load_config, parse_override, recipe_overrides

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_valid():
    config = load_config()
    assert config.privacy.epsilon == 3.0 and config.selection.fraction == 0.01


def test_toml_file_and_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[privacy]\nepsilon = 1\n[selection]\nmode = "patterns"\npatterns = ["*norm*"]\n')
    config = load_config(path, dict([parse_override("zo.lr=2e-4"), parse_override("model.name=smollm2")]))
    assert config.privacy.epsilon == 1.0 and isinstance(config.privacy.epsilon, float)
    assert config.selection.patterns == ["*norm*"]
    assert config.zo.lr == 2e-4 and config.model.name == "smollm2"


@pytest.mark.parametrize("override,message", [
    ("privacy.epsilon=-1", "privacy.epsilon must be > 0, got -1"),
    ("privacy.delta=2.0", "privacy.delta must be in (0, 1), got 2.0"),
    ("zo.batch_size=0", "zo.batch_size must be an int in [1, 1,000,000], got 0"),
    ("data.min_words=-1", "data.min_words must be an int in [0, 1,000,000,000], got -1"),
    ("zo.mu=nan", "zo.mu must be > 0, got nan"),
    ("zo.direction=uniform", "zo.direction must be one of"),
    ("selection.fraction=1.5", "selection.fraction must be in (0, 1], got 1.5"),
    ("selection.strategy=random", "selection.strategy must be one of"),
    ("schedule.stage_steps=[]", "schedule.stage_steps must be a list of 1 to 64 ints"),
    ("schedule.mu_decay=2.0", "schedule.mu_decay must be in (0, 1]"),
    ("privacy.lr=1", "unknown config key 'privacy.lr'"),
    ("selection.mode=patterns", "selection.patterns must name at least one pattern"),
    # one key per concept: the federation's old run-folder and evaluation keys name their replacement
    ("federation.run_dir=runs/x", "config key 'federation.run_dir' is now 'out_dir'"),
    ("federation.eval_every=2", "config key 'federation.eval_every' is now 'eval.every'"),
    # TOML booleans are Python ints: a field that wants a count must still refuse them by name
    ("federation.rounds=true", "federation.rounds must be an int, got True"),
    ("zo.batch_size=false", "zo.batch_size must be an int, got False"),
    ("privacy.epsilon=true", "privacy.epsilon must be a number, got True"),
    ("data.seed=-1", "data.seed must be an int in [0, 2^64), got -1"),
    ("data.seed=1.5", "data.seed must be an int, got 1.5"),
    ("data.seed=true", "data.seed must be an int, got True"),
    ("privacy.enabled=1", "privacy.enabled must be true or false, got 1"),
    ("model.name=[1]", "model.name must be a string, got [1]"),
    ("federation.trim=[0.1]", "federation.trim must be a number, got [0.1]"),
    ("selection.patterns=3", "selection.patterns must be a list, got 3"),
    # Issue 32, finding 9: every integer setting is bounded and paths hold no NUL. Huge integers passed the check
    # and failed late (threads: out of memory after the ledger was written; local_steps: MemoryError; rounds and
    # stage_steps: never ended); a NUL in out_dir was a traceback.
    ("threads=1000000000", "threads must be an int in [0, 1,024], got 1000000000"),
    ("federation.local_steps=1000000000000", "federation.local_steps must be an int in [1, 100,000]"),
    (f"federation.rounds={10**30}", "federation.rounds must be an int in [1, 1,000,000]"),
    (f"schedule.stage_steps=[{10**30}]", "schedule.stage_steps must be a list of 1 to 64 ints >= 1 summing to"),
    ("schedule.stage_steps=[9000000, 9000000]", "summing to at most 10,000,000"),
    ("model.microbatch=100000000", "model.microbatch must be an int in [1, 65,536]"),
    ("zo.directions=100000", "zo.directions must be an int in [0, 4,096]"),
    ("eval.every=100000000000", "eval.every must be an int in [0, 10,000,000]"),
    ('out_dir="runs/a\u0000b"', "out_dir must be a string without NUL characters"),
    ('data.train_file="a\u0000.csv"', "data.train_file must be a string without NUL characters"),
])
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=dict([parse_override(override)]))
    assert message in str(err.value)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[privacy\nepsilon = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("epsilon")



@pytest.mark.parametrize("toml, overrides, message", [
    ("privacy = 3\n", {}, "privacy must be a table, got 3"),
    ("privacy = 3\n", {"privacy.epsilon": 1.0}, "privacy must be a table, got 3"),
    ("[privacy]\nepsilon = 1\n", {"privacy": 2}, "privacy must be a table, got 2"),
    ("out_dir = 'x'\n", {"out_dir.sub": 1}, "out_dir must be a table, got 'x'"),
    ("[federation]\nrounds = { n = 3 }\n", {}, "federation.rounds must be an int, got {'n': 3}"),
])
def test_tables_of_the_wrong_type_name_the_field(tmp_path, toml, overrides, message):
    path = tmp_path / "run.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    assert message in str(err.value)


def test_seedtune_train_reports_a_wrong_type_with_exit_code_2(tmp_path, capsys):
    from seedtune.cli import main

    path = tmp_path / "run.toml"
    path.write_text("privacy = 3\n")
    assert main(["train", "--config", str(path), "-s", "privacy.epsilon=1"]) == 2
    assert "privacy must be a table, got 3" in capsys.readouterr().err


def test_every_setting_carries_its_help_and_bounds_as_field_metadata():
    """`seedtune config` prints each key's help from its field's metadata, not from comments read back from the
    source: a setting without help fails here, and a declared range or choice list is enforced by name."""
    import dataclasses

    from seedtune.shared.task.config import RunConfig, Settings, describe

    config = RunConfig()
    missing = []
    for section in dataclasses.fields(config):
        value = getattr(config, section.name)
        nested = isinstance(value, Settings)
        for f in dataclasses.fields(value) if nested else [section]:
            if not f.metadata.get("help"):
                missing.append(f"{section.name}.{f.name}" if nested else f.name)
    assert missing == []
    assert "max_length = 64  # tokens per example; a decoder prompt keeps its tail (the question)" in describe(config)
    with pytest.raises(ConfigError, match=r"model\.max_length must be an int in \[8, 131,072\], got 7"):
        load_config(None, {"model.max_length": 7})
    with pytest.raises(ConfigError, match=r"federation\.aggregation must be one of \('mean', 'trimmed_mean', 'median'\)"):
        load_config(None, {"federation.aggregation": "mode"})


def test_a_decoders_own_head_is_a_classifiers():
    """model.decoder_head = "linear", "unit" or "centred" replaces the label rows of a classifier; a generation task
    has none; model.head_layer is the centred head's."""
    from pathlib import Path

    e2e = str(Path(__file__).resolve().parents[1] / "configs" / "e2e.toml")
    for head in ("linear", "unit", "centred"):
        with pytest.raises(ConfigError, match=f"model.decoder_head other than 'label_rows' is a classifier's head.*'{head}'"):
            load_config([e2e], {"model.decoder_head": head})
    with pytest.raises(ConfigError, match=r"model\.decoder_head must be one of \('label_rows', 'linear', 'unit', "
                                          r"'centred'\)"):
        load_config(None, {"model.decoder_head": "tied"})
    with pytest.raises(ConfigError, match=r"model\.head_layer is the layer a 'centred' decoder head reads.*got 22"):
        load_config(None, {"model.decoder_head": "unit", "model.head_layer": 22})
    with pytest.raises(ConfigError, match=r"'centred' trains the head alone \(selection\.mode = 'head'\).*got 'centred'"):
        load_config(None, {"model.decoder_head": "centred", "selection.mode": "prune"})
    centred = {"model.decoder_head": "centred", "model.head_layer": 22, "selection.mode": "head"}
    assert load_config(None, centred).model.head_layer == 22



def test_the_federated_dpzo_recipe_overrides_the_head_stage_default_and_takes_secure_aggregation():
    """The main job defaults to the head stage; SEEDTUNE_RECIPE=configs/federated_dpzo.toml (scripts/simulate.sh) turns it
    back into DP-ZO over the pruned set. Its keys must be app-config keys (Flower refuses others), a key the user
    sets must win without being given twice (Flower refuses that too); secure aggregation takes either recipe (the
    head stage's with configs/federated_head_secure.toml)."""
    with open(ROOT / "pyproject.toml", "rb") as fh:
        app = flatten_dict(tomllib.load(fh)["tool"]["flwr"]["app"]["config"])
    assert config_from_flower(app).selection.mode == "head"
    recipe = recipe_overrides(ROOT / "configs" / "federated_dpzo.toml")
    parsed = parse_config_args([recipe])
    assert set(parsed) <= set(app)
    dpzo = config_from_flower({**app, **parsed})
    assert (dpzo.selection.mode, dpzo.zo.direction, dpzo.zo.directions) == ("prune", "rademacher", 1)
    yours = 'zo.lr=0.01 federation.local_steps=3'
    mixed = parse_config_args([f"{recipe_overrides(ROOT / 'configs' / 'federated_dpzo.toml', yours)} {yours}"])
    assert (mixed["zo.lr"], mixed["federation.local_steps"], mixed["selection.mode"]) == (0.01, 3, "prune")
    quoted = 'data.data_dir="/tmp/x federation.local_steps=3"'  # a value, not a key: the recipe's steps stay
    assert "federation.local_steps=10" in recipe_overrides(ROOT / "configs" / "federated_dpzo.toml", quoted)
    secure = {"federation.secure_aggregation": "secagg+", "federation.min_replies": 5}
    assert config_from_flower({**app, **parsed, **secure}).federation.secure_aggregation == "secagg+"
    secure_head = parse_config_args([recipe_overrides(ROOT / "configs" / "federated_head_secure.toml")])
    assert set(secure_head) <= set(app)
    head = config_from_flower({**app, **secure_head})  # the head stage's frame under secure aggregation
    assert (head.selection.mode, head.zo.directions, head.federation.secure_aggregation) == ("head", 0, "secagg+")
    with pytest.raises(ConfigError, match="no-such.toml"):
        recipe_overrides(ROOT / "configs" / "no-such.toml")


def test_a_config_file_key_beaten_by_the_app_config_is_named(caplog):
    """Flower's app config beats a config-file's keys, so a preset such as configs/quickstart.toml (selection.mode
    "prune") would otherwise run the head stage silently."""
    with open(ROOT / "pyproject.toml", "rb") as fh:
        app = flatten_dict(tomllib.load(fh)["tool"]["flwr"]["app"]["config"])
    with caplog.at_level("WARNING", logger="seedtune.shared.task.config"):
        config = config_from_flower({**app, "config-file": str(ROOT / "configs" / "quickstart.toml")})
    assert config.selection.mode == "head"
    assert "selection.mode = 'head', not 'prune'" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="seedtune.shared.task.config"):
        config_from_flower({**app, "config-file": str(ROOT / "configs" / "trec.toml")})  # task keys only
    assert "config-file" not in caplog.text


@pytest.mark.parametrize("preset", sorted(p.name for p in (ROOT / "configs").glob("*.toml")))
def test_every_shipped_preset_loads_and_validates(preset):
    """A preset the docs tell users to pass with -c must load and validate as shipped: a key renamed or a value
    refused would otherwise surface only in a user's run."""
    assert load_config([ROOT / "configs" / preset]).validate()
