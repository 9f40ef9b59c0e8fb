"""Tasks from a user's own files: formats, columns, labels, prompts, and every bad input named before a write."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from seedtune.client.privacy_ledger import data_key
from seedtune.shared.task.config import ConfigError, DataConfig, ModelConfig, RunConfig, TaskConfig, load_config
from seedtune.shared.task.loading import load_task_model
from seedtune.shared.task.tasks import (DataError, Prompter, classification_metrics, load_split, template_fields,
                                        with_labels)
from tests.helpers import QUESTIONS, write_csv

TREC_LIKE = TaskConfig(name="questions", text_fields=["text"], template="Question: {text}\nType:", labels=[],
                       label_words=[], label_prompts=[])


def _config(tmp_path, task=TREC_LIKE, **data) -> RunConfig:
    return RunConfig(task=task, data=DataConfig(data_dir=str(tmp_path / "data"), **data)).validate()


def _folder(tmp_path, train=QUESTIONS * 4, test=QUESTIONS):
    write_csv(tmp_path / "data" / "train.csv", train)
    write_csv(tmp_path / "data" / "test.csv", test)


# ------------------------------------------------------------------------------------------ formats
def test_a_csv_folder_with_string_labels_gives_sorted_labels_and_no_dev_split(tmp_path, caplog):
    caplog.set_level("INFO", logger="seedtune.shared.task.tasks")
    _folder(tmp_path)
    config = with_labels(_config(tmp_path))
    assert config.task.labels == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    assert "task.labels from the test split (sorted)" in caplog.text
    train, dev = load_split(config, "train"), load_split(config, "dev")
    assert len(train) == 24 and train.records[0] == ("How far is the moon?",) and train.labels[0] == 5
    assert len(dev) == 0  # no dev file: no dev split (never carved out of the private training split)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "tsv"])
def test_json_lines_parquet_and_tsv_read_likewrite_csv(tmp_path, fmt):
    import datasets

    folder = tmp_path / "data"
    folder.mkdir()
    for split, rows in (("train", QUESTIONS * 2), ("test", QUESTIONS)):
        ds = datasets.Dataset.from_dict({"text": [t for t, _ in rows], "label": [y for _, y in rows]})
        path = folder / f"{split}.{fmt}"
        if fmt == "jsonl":
            ds.to_json(str(path))
        elif fmt == "parquet":
            ds.to_parquet(str(path))
        else:
            path.write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    config = with_labels(_config(tmp_path))
    assert load_split(config, "test").records == [(t,) for t, _ in QUESTIONS]
    assert [config.task.labels[i] for i in load_split(config, "test").labels] == [y for _, y in QUESTIONS]


def test_explicit_files_and_numeric_labels_sorted_as_numbers(tmp_path):
    rows = [(f"item {i}", [2, 10, 1][i % 3]) for i in range(30)]
    train, test = write_csv(tmp_path / "a" / "mine.csv", rows), write_csv(tmp_path / "b" / "held_out.csv", rows[:9])
    config = with_labels(RunConfig(task=TREC_LIKE, data=DataConfig(train_file=str(train),
                                                                  test_file=str(test))).validate())
    assert config.task.labels == ["1", "2", "10"]


def test_a_pair_task_reads_both_fields_into_the_prompt_and_the_encoder_pair(tmp_path):
    path = tmp_path / "data"
    path.mkdir()
    rows = [{"premise": f"A man plays guitar {i}.", "hypothesis": "A person makes music.",
             "label": ["entailment", "not_entailment"][i % 2]} for i in range(8)]
    for split in ("train", "test"):
        (path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = TaskConfig(name="pairs", text_fields=["premise", "hypothesis"], labels=[], label_words=["yes", "no"],
                      label_prompts=[], template="{premise}\nQuestion: {hypothesis} True or false?\nAnswer:")
    config = with_labels(_config(tmp_path, task))
    assert config.task.labels == ["entailment", "not_entailment"] and config.task.prompts == ["yes", "no"]
    test = load_split(config, "test")
    assert test.records[0] == ("A man plays guitar 0.", "A person makes music.")
    assert Prompter.of(config.task).render(test.records[0]) == \
        "A man plays guitar 0.\nQuestion: A person makes music. True or false?\nAnswer:"
    decoder = load_task_model(ModelConfig(name="tiny-decoder"), config.task)
    ids = decoder.encode(test.records[:1])[0]
    assert ids == decoder.tokenizer(Prompter.of(config.task).render(test.records[0]), add_special_tokens=False)["input_ids"]
    encoder = load_task_model(ModelConfig(name="tiny-encoder"), config.task)
    pair = encoder.encode(test.records[:1])[0]
    assert pair.count(encoder.tokenizer.sep_token_id) == 2  # [CLS] premise [SEP] hypothesis [SEP]
    assert encoder.module.head.weight.shape[0] == 2


# ------------------------------------------------------------------------------------- K-label models
@pytest.mark.parametrize("name", ["tiny-encoder", "tiny-decoder"])
def test_k_label_models_score_k_labels_and_losses_match_the_log_softmax(tmp_path, name):
    _folder(tmp_path)
    config = with_labels(_config(tmp_path))
    task = load_task_model(ModelConfig(name=name), config.task)
    test = load_split(config, "test")
    batch = task.collate(task.encode(test.records), test.labels)
    logits = task.logits(batch)
    assert logits.shape == (6, 6)
    expected = -torch.log_softmax(logits.float(), -1)[torch.arange(6), batch.labels]
    torch.testing.assert_close(task.per_example_loss(batch), expected)
    metrics = task.evaluate(task.eval_set(test))
    assert set(metrics["per_label"]) == set(config.task.labels)
    assert sum(c["examples"] for c in metrics["per_label"].values()) == 6


def test_the_decoder_scores_each_label_words_first_token(tmp_path):
    task = TaskConfig(name="t", text_fields=["text"], template="Q: {text}\nA:", labels=["a", "b", "c"],
                      label_words=["location", "number", "human"], label_prompts=[])
    model = load_task_model(ModelConfig(name="tiny-decoder"), task)
    tok = model.tokenizer
    firsts = [tok(" " + w, add_special_tokens=False)["input_ids"][0] for w in task.label_words]
    assert model.module.label_ids.tolist() == firsts


def test_metrics_macro_f1_and_per_label_counts():
    predicted, labels = np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 2, 0])
    m = classification_metrics(predicted, labels, ["x", "y", "z"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    # F1: x 2*1/(2+2) = 0.5, y 2*1/(2+1) = 2/3, z 2*2/(2+3) = 0.8
    assert m["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 0.8) / 3)
    assert m["per_label"]["z"] == {"examples": 2, "predicted": 3, "correct": 2}


def test_sst2_stays_the_embedded_default_with_its_labels_and_prompt():
    config = RunConfig().validate()
    assert (config.task.name, config.task.labels, config.task.words) == ("sst2", ["0", "1"], ["negative", "positive"])
    test = load_split(config, "test")
    assert len(test) == 872 and int(test.labels.sum()) == 444
    preset = load_config("configs/sst2.toml")
    assert preset.task == config.task and preset.data.data_dir == "sst2"


# ------------------------------------------------------------------------------ bad inputs, each named
def test_a_missing_file_is_named(tmp_path):
    write_csv(tmp_path / "data" / "train.csv", QUESTIONS)
    with pytest.raises(DataError, match=r"data: no test file \(expected test.csv"):
        with_labels(_config(tmp_path))
    with pytest.raises(DataError, match="data.train_file '/nope/train.csv' does not exist"):
        with_labels(RunConfig(task=TREC_LIKE, data=DataConfig(train_file="/nope/train.csv",
                                                              test_file="/nope/test.csv")).validate())
    with pytest.raises(DataError, match="data.data_dir 'no-such-folder': no folder with train and test files"):
        with_labels(RunConfig(task=TREC_LIKE, data=DataConfig(data_dir="no-such-folder")).validate())


def test_a_missing_column_is_named_with_the_columns_there(tmp_path):
    write_csv(tmp_path / "data" / "train.csv", QUESTIONS, header="question,label")
    write_csv(tmp_path / "data" / "test.csv", QUESTIONS, header="question,label")
    with pytest.raises(DataError, match=r"test.csv: no column 'text' \(task.text_fields\); its columns are "
                                        r"\['question', 'label'\]"):
        with_labels(_config(tmp_path))
    write_csv(tmp_path / "data" / "test.csv", QUESTIONS)
    with pytest.raises(DataError, match=r"train.csv: no column 'text' \(task.text_fields\)"):
        load_split(with_labels(_config(tmp_path)), "train")
    write_csv(tmp_path / "data" / "test.csv", QUESTIONS, header="question,label")
    task = TaskConfig(name="q", text_fields=["question"], label_field="kind", template="{question}", labels=[],
                      label_words=[], label_prompts=[])
    with pytest.raises(DataError, match=r"no column 'kind' \(task.label_field\)"):
        with_labels(_config(tmp_path, task))


def test_an_empty_split_is_named(tmp_path):
    _folder(tmp_path, test=[])
    with pytest.raises(DataError, match="test.csv: no examples"):
        load_split(with_labels(_config(tmp_path)), "test")
    (tmp_path / "data" / "test.csv").write_text("")
    with pytest.raises(DataError, match="test.csv: empty file"):
        load_split(with_labels(_config(tmp_path)), "test")


def test_a_test_label_the_task_does_not_know_is_named_with_its_record(tmp_path):
    _folder(tmp_path, test=QUESTIONS + [("What colour is the sky?", "COLOUR")])
    stated = dataclasses.replace(TREC_LIKE, labels=["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"])
    with pytest.raises(DataError, match=r"test.csv: record 7 has label 'COLOUR', not one of the task's labels"):
        load_split(_config(tmp_path, stated), "test")


def test_records_without_text_or_label_are_named(tmp_path):
    _folder(tmp_path, train=QUESTIONS + [("", "HUM")])
    with pytest.raises(DataError, match="train.csv: record 7 has no text in 'text'"):
        load_split(with_labels(_config(tmp_path)), "train")
    _folder(tmp_path, train=QUESTIONS + [("Who?", "")])
    with pytest.raises(DataError, match="train.csv: record 7 has no 'label'"):
        load_split(with_labels(_config(tmp_path)), "train")


def test_a_template_placeholder_that_is_not_a_column_is_named():
    with pytest.raises(ConfigError, match=r"task.template names \['question'\] which are not task.text_fields"):
        TaskConfig(text_fields=["text"], template="Q: {question}\nA:").validate()
    with pytest.raises(ConfigError, match="must use every text field"):
        TaskConfig(text_fields=["premise", "hypothesis"], template="{premise} ?").validate()
    with pytest.raises(ConfigError, match="is not a valid template"):
        TaskConfig(template="Review: {sentence\nSentiment:").validate()
    assert template_fields("{a} and {b}:") == ["a", "b"]


def test_two_labels_with_the_same_label_words_are_refused():
    with pytest.raises(ConfigError, match="task.label_words must not repeat a value"):
        TaskConfig(labels=["0", "1"], label_words=["good", "good"]).validate()
    with pytest.raises(ConfigError, match="one entry per label"):
        TaskConfig(labels=["0", "1", "2"], label_words=["good", "bad"], label_prompts=[]).validate()
    same_start = TaskConfig(labels=["a", "b"], label_words=["ham", "hamster"], label_prompts=[])
    with pytest.raises(ConfigError, match="'ham' and 'hamster' begin with the same token"):
        load_task_model(ModelConfig(name="tiny-decoder"), same_start)


def test_non_utf8_text_is_named_by_its_line(tmp_path):
    _folder(tmp_path)
    path = tmp_path / "data" / "train.csv"
    path.write_bytes(path.read_bytes() + "\"Qu'est-ce qu'un caf\xe9 ?\",DESC\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"train.csv:26: not UTF-8 text \(byte 0xe9"):
        load_split(with_labels(_config(tmp_path)), "train")


def test_a_malformed_csv_row_is_named(tmp_path):
    _folder(tmp_path)
    path = tmp_path / "data" / "test.csv"
    path.write_text(path.read_text() + "one,two,three\n")
    with pytest.raises(DataError, match="test.csv:8: 3 field\\(s\\) where the header names 2"):
        load_split(with_labels(_config(tmp_path)), "test")


@pytest.mark.parametrize("setup, message", [
    ("no_column", "no column 'text'"),
    ("unknown_label", "has label 'COLOUR'"),
    ("not_utf8", "not UTF-8 text"),
])
def test_seedtune_train_names_bad_data_with_exit_code_2_and_writes_nothing(tmp_path, capsys, setup, message):
    from seedtune.cli import main

    # labels = []: the public test split names them, and a training record outside them is refused
    _folder(tmp_path, train=QUESTIONS * 4 + [("What colour is the sky?", "COLOUR")] if setup == "unknown_label"
            else QUESTIONS * 4)
    if setup == "no_column":
        write_csv(tmp_path / "data" / "train.csv", QUESTIONS, header="question,label")
    if setup == "not_utf8":
        (tmp_path / "data" / "test.csv").write_bytes(b"text,label\ncaf\xe9,DESC\n")
    cfg = tmp_path / "task.toml"
    cfg.write_text('[task]\nname = "questions"\ntext_fields = ["text"]\ntemplate = "Q: {text}\\nA:"\nlabels = []\n'
                   'label_words = []\nlabel_prompts = []\n')
    code = main(["train", "--no-progress", "-c", str(cfg), "-s", "model.name=tiny-encoder",
                 "-s", f"data.data_dir={tmp_path / 'data'}", "--out", str(tmp_path / "run")])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# Issue 32, finding 12: a repeated column was read as its first occurrence, and a row with one field too many
# shifted every value one column over (the label read as the text), both without a word.
@pytest.mark.parametrize("name, content, message", [
    ("train.csv", 'text,label,text\n"How far?",NUM,"Who?"\n', "the header names column(s) ['text'] more than once"),
    ("train.csv", 'text,label\n"How far?",NUM\n"Who wrote it?",HUM,extra\n', "train.csv:3: 3 field(s) where "
     "the header names 2 (a stray comma or quote?)"),
    ("train.tsv", 'text\tlabel\nHow far?\tNUM\tNUM\n', "train.tsv:2: 3 field(s) where the header names 2 (a "
     "stray tab?)"),
])
def test_repeated_columns_and_ragged_rows_are_refused_by_line(tmp_path, name, content, message):
    write_csv(tmp_path / "data" / "test.csv", QUESTIONS)
    (tmp_path / "data" / name).write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_split(with_labels(_config(tmp_path), split="test"), "train")
    assert message in str(err.value)


def test_labels_never_come_from_the_private_training_split(tmp_path, capsys):
    """Issue 32, finding 4: with labels = [] the label set was read from the training split and published in the
    ledger header, summary.json and the model card (a label one record held appeared there)."""
    import sqlite3

    from seedtune.cli import main
    from seedtune.shared.protocol.proto import LedgerHeader

    with pytest.raises(ConfigError, match="task.labels cannot come from the training split"):
        with_labels(_config(tmp_path), "train")
    _folder(tmp_path, train=QUESTIONS * 4 + [("Who holds this one secret?", "SECRET")])
    cfg = tmp_path / "task.toml"
    cfg.write_text('[task]\nname = "questions"\ntext_fields = ["text"]\ntemplate = "Q: {text}\\nA:"\nlabels = []\n'
                   'label_words = []\nlabel_prompts = []\n')
    args = ["train", "--no-progress", "-c", str(cfg), "-s", "model.name=tiny-encoder", "-s", "eval.every=0",
            "-s", f"data.data_dir={tmp_path / 'data'}", "-s", "schedule.stage_steps=[2]", "-s", "zo.batch_size=4"]
    # the private record's label is not among the public labels: refused before anything is written
    assert main(args + ["--out", str(tmp_path / "run")]) == 2 and not (tmp_path / "run").exists()
    assert "has label" in capsys.readouterr().err
    _folder(tmp_path)
    assert main(args + ["--out", str(tmp_path / "run")]) == 0
    conn = sqlite3.connect(tmp_path / "run" / "ledger.sqlite")
    header = LedgerHeader.FromString(conn.execute("SELECT value FROM meta WHERE key = 'header'").fetchone()[0])
    conn.close()
    assert json.loads(header.config_json)["task"]["labels"] == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]


# ---------------------------------------------------------------------------------- privacy of the key
def test_the_data_key_is_the_records_not_the_task_name_or_prompt():
    records = [(("How far is the moon?",), "NUM"), (("Who wrote Hamlet?",), "HUM")]
    assert data_key(records) == data_key(list(records))  # what a renamed task or a new prompt cannot change
    assert data_key(records) != data_key(records[:1])
    assert data_key([(("a", "b"), "x")]) != data_key([(("ab",), "x")])  # fields are delimited
