"""Settings of a run: the flags generated from the fields of Config, their help, the
precedence command line > --config file > saved run > data set's defaults."""

import argparse
import dataclasses
import json

import pytest

from fastlaplace import train as train_mod
from fastlaplace.config import RESUMABLE_CHANGES, USER_ONLY, Config, add_arguments, check_types, given
from fastlaplace.datasets import DATASETS
from fastlaplace.methods import METHODS
from fastlaplace.models import sinusoid_mlp
from fastlaplace.options import Loss


def help_text() -> str:
    parser = argparse.ArgumentParser(prog="x")
    add_arguments(parser)
    return parser.format_help()


def test_every_field_has_its_flag_and_help():
    text = help_text()
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.metadata["flag"]:
            assert flag in text and f.metadata["help"].split()[0] in text, f.name
        else:
            assert flag not in text
    # The help names each data set's default, from the data sets' specs themselves.
    assert "sinusoid 10000" in text and "miniimagenet 60000" in text and "digits 1000" in text


def test_flags_parse_to_the_fields_types():
    cfg, resume, progress = train_mod.parse_args(
        ["--x-range", "-5", "5", "--test-inner-steps", "1", "5", "--allow-pickle", "--meta-lr", "0.01",
         "--meta-batch", "6", "--method", "maml", "--no-progress"])
    assert (cfg.x_range, cfg.test_inner_steps, cfg.allow_pickle, cfg.meta_lr, cfg.meta_batch, cfg.method) == (
        [-5.0, 5.0], [1, 5], True, 0.01, 6, "maml")
    assert not resume and not progress
    check_types(dataclasses.asdict(cfg), "parsed")  # the same types a JSON file must have
    assert train_mod.parse_args([])[0] == Config()  # nothing given: every field at its default


def test_given_keeps_only_the_flags_used():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert given(parser.parse_args(["--tau", "0.5", "--x-range", "0", "1"])) == {"tau": 0.5, "x_range": [0.0, 1.0]}


def test_precedence_command_line_over_file_over_data_set_defaults(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"dataset": "digits", "meta_lr": 0.5, "iterations": 7}))
    cfg = train_mod.parse_args(["--config", str(path), "--meta-lr", "0.1"])[0].resolved()
    assert (cfg.meta_lr, cfg.iterations) == (0.1, 7)
    assert cfg.inner_steps == DATASETS["digits"].defaults["inner_steps"] and cfg.filters == 32


def test_resume_reads_the_saved_settings_under_those_given(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"method": "maml", "iterations": 5, "meta_lr": 0.2}))
    cfg = train_mod.parse_args(["--resume", "--out", str(run), "--iterations", "9"])[0]
    assert (cfg.method, cfg.iterations, cfg.meta_lr, cfg.out) == ("maml", 9, 0.2, str(run))


def test_resume_rules_come_from_the_fields():
    assert RESUMABLE_CHANGES == ("iterations", "meta_lr", "inner_lr", "device", "conv_strategy", "task_chunk",
                                 "recompute_query", "checkpoint_every", "log_every", "eval_tasks", "val_every",
                                 "val_tasks", "cuda_graph")
    assert USER_ONLY == ("out", "data_root", "allow_pickle", "overwrite")


@pytest.mark.parametrize("values, message", [
    ({"x_range": [0, True]}, "x_range must be a list of numbers"),
    ({"test_inner_steps": [1.5]}, "test_inner_steps must be a list of integers or null"),
    ({"allow_pickle": 1}, "allow_pickle must be true or false"),
    ({"meta_lr": "big"}, "meta_lr must be a number or null"),
])
def test_types_of_a_settings_file(values, message):
    with pytest.raises(ValueError, match=message):
        check_types(values, "f.json")


def test_task_chunk_and_recompute_query_reach_the_learner():
    cfg = train_mod.parse_args(["--method", "maml", "--task-chunk", "3", "--recompute-query"])[0]
    assert cfg.task_chunk == 3 and cfg.recompute_query
    learner = METHODS["maml"](sinusoid_mlp(), Loss.MSE, cfg.resolved())
    assert learner.net.task_chunk == 3 and learner.recompute_query
    with pytest.raises(ValueError, match="--recompute-query cannot be captured in a CUDA graph"):
        Config(recompute_query=True, cuda_graph=True, device="cuda").resolved()
