import dataclasses
import json
import re
import sqlite3
import subprocess
import sys

import pytest

from seedtune.shared.privacy.accounting import StepRun, noise_epsilon
from seedtune.shared.privacy.noise import Noise


def _seedtune(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "seedtune.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_train_cli_prints_a_summary_line(tmp_path):
    out = _seedtune("train", "--no-progress", "--out", str(tmp_path / "run"),
                    "-s", "model.name=tiny-encoder", "-s", "schedule.stage_steps=[6,6]", "-s", "eval.every=4",
                    "-s", "eval.dev_size=32", "-s", "data.test_size=64", "-s", "data.train_size=2000",
                    "-s", "schedule.prox=0.1", "-s", "selection.strategy=dynamic", "-s", "privacy.epsilon=2")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("model", "task", "steps", "epsilon", "delta", "test_accuracy", "zero_shot_accuracy", "wall_s"):
        assert key in summary
    assert summary["steps"] == 12 and summary["model"] == "tiny-encoder"
    assert 1.9 < summary["epsilon"] <= 2.0  # calibrated for the whole run, reported by the PLD accountant
    # the stages' epsilons, each alone, compose to the printed total
    stage_runs = tuple(StepRun(Noise.gaussian(summary["noise_std"]), summary["sample_rate"], 6) for _ in range(2))
    assert len(summary["epsilon_per_stage"]) == 2 and summary["epsilon_per_stage"][0] < summary["epsilon"]
    assert noise_epsilon(stage_runs, 1e-5) == pytest.approx(summary["epsilon"], rel=1e-3)
    assert noise_epsilon(stage_runs[:1], 1e-5) == summary["epsilon_per_stage"][0] == summary["epsilon_per_stage"][1]
    assert 1850 < summary["train_size"] < 2150 and summary["test_size"] == 64  # kept per record: about 2000
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 13 and sum("dev_accuracy" in r for r in rows) == 4
    assert {r["stage"] for r in rows[1:]} == {0, 1} and rows[0]["step"] == 0


def test_non_private_mezo_mode_reports_no_epsilon(tmp_path):
    out = _seedtune("train", "--no-progress", "--out", str(tmp_path / "run"), "-s", "model.name=tiny-decoder",
                    "-s", "privacy.enabled=false", "-s", "schedule.stage_steps=[3]", "-s", "eval.every=0",
                    "-s", "data.test_size=32", "-s", "data.train_size=500")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["epsilon"] is None and summary["noise"] is None and summary["noise_std"] == 0.0


@pytest.mark.parametrize("override,message", [("privacy.clip=0", "privacy.clip must be > 0"),
                                              ("zo.batch_size=100000", "exceeds the training set size"),
                                              ("zo.directions=0", "0 (a full frame) needs zo.direction = 'hadamard'"),
                                              ("privacy.noise=laplace", "zo.directions other than 1 needs privacy.noise"),
                                              # issue 32: a fixed multiplier ran past privacy.epsilon unannounced
                                              ("privacy.noise_multiplier=0.5",
                                               "privacy.noise_multiplier 0.5 spends epsilon")])
def test_bad_config_fails_with_a_clear_error(tmp_path, override, message):
    out = _seedtune("train", "--no-progress", "--out", str(tmp_path / "run"), "-s", "model.name=tiny-decoder",
                    "-s", "data.train_size=100", "-s", "zo.directions=2", "-s", override)
    assert out.returncode == 2
    assert message in out.stderr


@pytest.mark.parametrize("directions", [1, 3])
def test_replaying_the_run_ledger_rebuilds_the_trained_model(tmp_path, directions):
    from seedtune.client.trainer import train
    from seedtune.shared.protocol.ledger import Ledger
    from seedtune.server.replay import replay
    from seedtune.shared.task.config import load_config
    from seedtune.shared.protocol.digest import model_digest
    from seedtune.shared.task.loading import load_task_model

    config = load_config(overrides={"model.name": "tiny-decoder", "schedule.stage_steps": [4, 3], "eval.every": 0,
                                    "data.train_size": 400, "data.test_size": 32, "zo.directions": directions,
                                    "out_dir": str(tmp_path / "run")})
    summary = train(config, progress=False)
    assert summary["directions_per_step"] == directions
    ledger = Ledger.open(summary["ledger"])
    try:  # one entry per direction, one round per step
        assert len(ledger) == ledger.verify() == 7 * directions and ledger.last_round == 7
        entries = list(ledger.entries())
        assert any(e.coeff != 0.0 for e in entries) and len({e.seed for e in entries}) == 7 * directions
    finally:
        ledger.close()
    rebuilt = replay(summary["ledger"])
    assert rebuilt["entries"] == 7 * directions and rebuilt["model_digest"] == summary["model_digest"]
    assert model_digest(load_task_model(config.model).module) != summary["model_digest"]  # training moved it


def test_ledger_eval_scores_base_tail_means_and_last_state(tmp_path, capsys):
    from seedtune.client.trainer import train
    from seedtune.shared.task.config import load_config
    from seedtune.simulations.ledger_eval import main, tail_weight

    assert [tail_weight(t, 4, 2) for t in range(4)] == [1.0, 1.0, 1.0, 0.5]  # mean of theta_3 and theta_4
    config = load_config(overrides={"model.name": "tiny-decoder", "schedule.stage_steps": [5], "eval.every": 0,
                                    "data.train_size": 400, "data.test_size": 48, "out_dir": str(tmp_path / "run")})
    summary = train(config, progress=False)
    assert main([summary["ledger"], "--tail", "1", "5", "--dev-size", "32", "--json"]) == 0
    base, tail1, tail5, last = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert base["test_accuracy"] == summary["zero_shot_accuracy"]
    assert last["test_accuracy"] == summary["test_accuracy"] and last["model"] == "last state (5 entries)"
    assert {k: v for k, v in tail1.items() if k != "model"} == {k: v for k, v in last.items() if k != "model"}
    assert sum(tail5["dev_predicted_share"].values()) == pytest.approx(1.0) and last["dev_share"] == {"0": 0.5, "1": 0.5}
    assert last["test_macro_f1"] == summary["test_macro_f1"]
    with pytest.raises(SystemExit):
        main([summary["ledger"], "--tail", "6"])


def test_runs_outside_the_ledger_model_say_so(tmp_path):
    from seedtune.client.trainer import train
    from seedtune.shared.task.config import load_config

    config = load_config(overrides={"model.name": "tiny-decoder", "schedule.stage_steps": [2], "eval.every": 0,
                                    "schedule.prox": 0.1, "data.train_size": 200, "data.test_size": 16,
                                    "out_dir": str(tmp_path / "run")})
    summary = train(config, progress=False)
    assert summary["ledger"] is None and not (tmp_path / "run" / "ledger.sqlite").exists()


def _resume_args(out, *extra):
    return ("train", "--no-progress", "--out", str(out), "-s", "model.name=tiny-encoder", "-s",
            "schedule.stage_steps=[90,60]", "-s", "eval.every=0", "-s", "data.train_size=1500", "-s",
            "data.test_size=32", *extra)


def test_a_killed_train_resumes_to_the_uninterrupted_runs_epsilon(tmp_path):
    """SIGKILL mid-run, then --resume: the accountant continues from the ledger's committed steps (not from
    zero), the run ends at the planned step count with the epsilon of a run never interrupted, and its ledger
    replays to the model it reports."""
    import os
    import signal
    import time

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "seedtune.cli", *_resume_args(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    from seedtune.shared.protocol.ledger import Ledger

    ledger = Ledger.open(out / "ledger.sqlite")
    done = ledger.last_round
    ledger.close()
    assert 5 <= done < 150 and not (out / "summary.json").exists()

    fresh = _seedtune(*_resume_args(out))  # no --resume: the interrupted run's ledger is never replaced
    assert fresh.returncode == 2 and "holds an interrupted run" in fresh.stderr and "--resume" in fresh.stderr
    refused = _seedtune(*_resume_args(out, "--resume", "-s", "privacy.epsilon=2"))
    assert refused.returncode == 2 and "differs in privacy.epsilon 3.0 -> 2.0" in refused.stderr

    resumed = _seedtune(*_resume_args(out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    whole = json.loads(_seedtune(*_resume_args(tmp_path / "whole")).stdout.strip().splitlines()[-1])
    assert summary["resumed_at_step"] == done and summary["steps"] == whole["steps"] == 150
    assert summary["epsilon"] == whole["epsilon"] and 2.9 < summary["epsilon"] <= 3.0
    replay = json.loads(_seedtune("replay", str(out / "ledger.sqlite")).stdout)
    assert replay["entries"] == 150 and replay["model_digest"] == summary["model_digest"]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    # (the killed run may have committed its last step without writing that step's row)
    assert steps == sorted(set(steps)) and set(range(done + 1, 151)) <= set(steps) and steps[-1] == 150


def test_resume_refuses_a_folder_without_an_interrupted_run(tmp_path):
    out = _seedtune(*_resume_args(tmp_path / "none", "--resume"))
    assert out.returncode == 2 and "holds no interrupted run to resume" in out.stderr
    assert not (tmp_path / "none").exists()


def _finished_then_interrupted(tmp_path):
    """A short train run on a CSV folder, turned into an interrupted one (its summary removed): every check of
    --resume runs before the loop, so a finished run's folder shows each refusal in a second."""
    from seedtune.cli import main
    from tests.helpers import QUESTIONS, write_csv

    write_csv(tmp_path / "data" / "train.csv", QUESTIONS * 20)
    write_csv(tmp_path / "data" / "test.csv", QUESTIONS)
    cfg = tmp_path / "task.toml"
    cfg.write_text('[task]\nname = "questions"\ntext_fields = ["text"]\ntemplate = "Q: {text}\\nA:"\n'
                   'labels = ["DESC", "ENTY", "HUM", "LOC", "NUM", "ABBR"]\nlabel_words = []\nlabel_prompts = []\n')
    args = ["train", "--no-progress", "-c", str(cfg), "-s", "model.name=tiny-encoder", "-s", "eval.every=0",
            "-s", f"data.data_dir={tmp_path / 'data'}", "-s", "schedule.stage_steps=[4]", "-s", "zo.batch_size=6",
            "--out", str(tmp_path / "run")]
    assert main(args) == 0
    (tmp_path / "run" / "summary.json").unlink()
    return args + ["--resume"]


def test_resume_refuses_changed_training_data_a_ledger_behind_its_anchor_and_a_lost_anchor(tmp_path, capsys):
    """Issue 32, findings 2 and 3: --resume accepted a training file with 1,800 appended rows (epsilon 2.85
    reported as 0.38: the steps so far accounted at the new, lower rate), and a ledger that lost its last steps
    (they would be released again with fresh noise, unaccounted); deleting metrics.jsonl removed the anchor."""
    from seedtune.cli import main
    from tests.helpers import QUESTIONS, write_csv

    resume = _finished_then_interrupted(tmp_path)
    run, train_csv = tmp_path / "run", tmp_path / "data" / "train.csv"
    kept = {p.name: p.read_bytes() for p in run.iterdir()}
    saved = train_csv.read_bytes()

    write_csv(train_csv, QUESTIONS * 21)  # appended rows: a lower sampling rate for the steps already released
    assert main(resume) == 2
    assert "training data" in (err := capsys.readouterr().err) and "it has 126 records" in err and "120" in err
    write_csv(train_csv, list(reversed(QUESTIONS * 20)))  # same count, other order
    assert main(resume) == 2 and "other content or order" in capsys.readouterr().err
    train_csv.write_bytes(saved)

    conn = sqlite3.connect(run / "ledger.sqlite")  # the last two steps lost (as with a lost WAL)
    conn.executescript("".join(f"DELETE FROM {t} WHERE round > 2; " for t in
                               ("entries", "rounds", "replies", "instructions", "records")))
    conn.close()
    assert main(resume) == 2 and "ends at round 2, but its anchor" in capsys.readouterr().err
    for name, data in kept.items():
        (run / name).write_bytes(data)

    # the whole run folder rolled back consistently (a restored backup: ledger and metrics at step 2), or its
    # metrics deleted: the anchor kept outside the run folder still records step 4
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("".join(line for line in lines if json.loads(line)["step"] <= 2))
    conn = sqlite3.connect(run / "ledger.sqlite")
    conn.executescript("".join(f"DELETE FROM {t} WHERE round > 2; " for t in
                               ("entries", "rounds", "replies", "instructions", "records")))
    conn.close()
    assert main(resume) == 2
    assert re.search(r"ends at round 2, but its anchor \(.*anchors/[0-9a-f]{64}\.json\) records round 4",
                     capsys.readouterr().err)
    (run / "metrics.jsonl").unlink()
    assert main(resume) == 2 and "but its anchor" in capsys.readouterr().err
    for name, data in kept.items():
        (run / name).write_bytes(data)
    (run / "metrics.jsonl").unlink()  # a whole ledger with its run folder's anchor gone: the one outside holds
    assert main(resume) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["resumed_at_step"] == 4
    for name, data in kept.items():
        (run / name).write_bytes(data)
    (run / "summary.json").unlink(missing_ok=True)
    (run / "metrics.jsonl").unlink()
    for outside in (tmp_path / "anchors").iterdir():  # and the anchor outside it deleted too
        outside.unlink()
    assert main(resume) == 2 and "anchors none of the ledger's 4 steps" in capsys.readouterr().err
    (run / "data-pin.json").unlink()
    assert main(resume + ["--unanchored"]) == 2 and "data-pin.json is missing" in capsys.readouterr().err
    (run / "data-pin.json").write_bytes(kept["data-pin.json"])
    assert main(resume + ["--unanchored"]) == 0  # the user vouches for the ledger: it resumes (nothing left to do)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["resumed_at_step"] == 4


@pytest.mark.parametrize("name,head", [("tiny-encoder", "label_rows"), ("tiny-decoder", "label_rows"),
                                       ("tiny-decoder", "linear"), ("tiny-decoder", "unit"),
                                       ("tiny-decoder", "centred")])
@pytest.mark.parametrize("direction,directions", [("rademacher", 16), ("hadamard", 0)])
def test_a_head_only_run_replays_to_the_trainers_digest(tmp_path, name, head, direction, directions):
    """selection.mode = "head": K directions over the head's entries, each record's features computed once; the
    ledger is the usual (seed, coeff) history and replays to the trainer's model. zo.directions = 0 with Hadamard
    directions is a full frame (K = the power of two at or above the head's size), whose rounds the trainer and
    replay both add as one sum per frame."""
    from seedtune.client.trainer import train
    from seedtune.server.replay import replay
    from seedtune.shared.task.config import load_config

    config = load_config(overrides={"model.name": name, "model.decoder_head": head, "selection.mode": "head",
                                    "model.head_layer": 1 if head == "centred" else 0,
                                    "schedule.stage_steps": [5],
                                    "zo.direction": direction, "zo.directions": directions, "zo.lr": 0.5,
                                    "privacy.clip": 1.0, "eval.every": 0, "data.train_size": 300,
                                    "data.test_size": 32, "out_dir": str(tmp_path / "run")})
    summary = train(config, progress=False)
    size = 2 * 32 + 2 if name == "tiny-encoder" else 2 * 32
    k = directions or (128 if name == "tiny-encoder" else 64)
    assert summary["trainable_entries"] == size and summary["directions_per_step"] == k
    assert summary["epsilon"] <= 3.0 + 1e-9
    rebuilt = replay(summary["ledger"], tmp_path / "model")  # saved with its model card (it raised KeyError)
    assert rebuilt["entries"] == 5 * k and rebuilt["model_digest"] == summary["model_digest"]
    assert "the classifier head only" in (tmp_path / "model" / "README.md").read_text()
    if head != "label_rows":  # the saved folder holds the decoder's own head (HEAD_FILE), and seedtune.json its
        # setting: seedtune.load_model builds that head and loads it (it built the label-row classifier before)
        from seedtune.shared.engine.replica import load_saved
        from seedtune.shared.protocol.digest import model_digest

        saved = load_saved(tmp_path / "model")
        assert model_digest(saved.module) == summary["model_digest"]
        if head == "centred":
            assert saved.module.depth == config.model.head_layer


def test_a_run_whose_anchors_folder_is_not_writable_stops_before_writing_anything(tmp_path, monkeypatch, capsys):
    """Every step's anchor also goes outside the run folder (shared.protocol.run_folder.anchor_home): a folder that
    cannot take it is refused at the start, by name, rather than after a step was committed and released."""
    from seedtune.cli import main

    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the anchors folder should be")
    monkeypatch.setenv("SEEDTUNE_ANCHORS", str(blocked / "anchors"))
    assert main(["train", "-s", "model.name=tiny-encoder", "-s", "data.train_size=64", "-s", "data.test_size=16",
                 "-s", "schedule.stage_steps=[2]", "--out", str(tmp_path / "run")]) == 2
    assert "not-a-folder/anchors, where runs keep their ledger's anchor" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
