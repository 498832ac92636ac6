"""Flags and --config YAML: one set of checks for both, one help style, one error style, for every command."""
import re

import pytest

from conftest import run_cli
from phitune import cli
from phitune.config import TrainArgs


def _help(command, capsys, *extra):
    assert run_cli(command, *extra, "--help") == 0
    return capsys.readouterr().out


def _entries(text):
    """The help text as one string per option (wrapped lines joined)."""
    return [" ".join(e.split()) for e in re.split(r"\n\s{2}(?=-)", text)]


# ---------------------------------------------------------------- YAML values are checked as flags are

@pytest.mark.parametrize("yaml_text,problem", [
    ("batch_size:\n", "batch_size: has no value"),
    ("use_dora:\n", "use_dora: has no value"),
    ("template:\n", "template: has no value"),
    ("batch_size: true\n", "batch_size: expected int, got True"),
    ("model: [a, b]\n", "model: expected str, got ['a', 'b']"),
    ("learning_rate: {a: 1}\n", "learning_rate: expected float"),
])
def test_yaml_values_are_validated_exactly_as_flags(tmp_path, capsys, yaml_text, problem):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"dataset_path: d.jsonl\noutput_dir: {tmp_path / 'out'}\n" + yaml_text)
    assert run_cli("train", "--config", cfg) == 2
    err = capsys.readouterr().err
    assert problem in err and "Traceback" not in err, err


def test_yaml_null_on_an_optional_field_means_not_given(tmp_path):
    import argparse

    from phitune.config import GROUPS, add_arguments, build_config
    cfg = tmp_path / "run.yaml"
    cfg.write_text("max_steps:\nlayers:\nquantize:\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser, GROUPS)
    parts = build_config(parser.parse_args(["--config", str(cfg)]))
    assert parts["train"].max_steps is None and parts["lora"].layers is None and parts["model"].quantize is None


def test_export_yaml_null_format_fails_before_any_work(tmp_path, capsys):
    cfg = tmp_path / "export.yaml"
    cfg.write_text(f"adapter_path: {tmp_path / 'missing_adapter'}\noutput: {tmp_path / 'm.gguf'}\nformat:\n")
    assert run_cli("export", "--config", cfg) == 2
    err = capsys.readouterr().err
    assert "format: has no value" in err and "missing_adapter" not in err


# ---------------------------------------------------------------- help and parse errors

@pytest.mark.parametrize("command", ["train", "chat", "compare", "eval", "serve", "merge", "export", "plan"])
def test_help_shows_each_default_once(command, capsys):
    text = _help(command, capsys)
    doubled = [e for e in _entries(text) if e.count("(default:") > 1]
    assert not doubled, doubled
    assert "(default: None)" not in " ".join(text.split())
    assert "option_strings" not in text  # a bare % in a help text once printed argparse's internals


def test_mistyped_flag_gets_the_command_usage_and_a_suggestion(capsys):
    assert run_cli("train", "--batch_sise", "4") == 2
    err = capsys.readouterr().err
    assert "phitune train: error: unrecognized arguments: --batch_sise" in err
    assert "did you mean --batch_size?" in err
    assert run_cli("serve", "--max-batch=4") == 2
    assert "did you mean --max_batch?" in capsys.readouterr().err
    assert run_cli("data", "inspect", "d.jsonl", "--colums", "a=b") == 2
    assert "phitune data inspect: error: unrecognized arguments: --colums a=b; did you mean --columns?" in \
        capsys.readouterr().err


def test_missing_required_option_names_the_flag(capsys):
    assert run_cli("export", "--adapter_path", "x") == 2
    err = capsys.readouterr().err
    assert "error: --output is required" in err


@pytest.mark.parametrize("given,expected", [(["none"], []), (["None"], []), (["tensorboard"], ["tensorboard"])])
def test_report_to_none_means_no_trackers(given, expected):
    assert TrainArgs(report_to=given).report_to == expected


def test_report_to_none_with_a_tracker_is_refused():
    from phitune.errors import ConfigError
    with pytest.raises(ConfigError, match="report_to: none cannot be combined"):
        TrainArgs(report_to=["none", "wandb"])


def _parse(command, *argv):
    parser = cli.build_parser([command])
    return parser.parse_args([command, *argv])


def test_boolean_flags_are_name_and_no_name_with_old_spellings_hidden(capsys):
    assert _parse("train", "--use_dora").use_dora is True
    assert _parse("train", "--no_use_dora").use_dora is False
    assert _parse("train", "--no-use_dora").use_dora is False  # the earlier spelling still works
    assert _parse("train", "--no_gradient_checkpointing").gradient_checkpointing == "false"
    assert _parse("train", "--no-gradient_checkpointing").gradient_checkpointing == "false"
    assert _parse("eval", "--no_generate").no_generate is True
    assert _parse("serve", "--api-key", "k").api_key == "k"
    text = _help("train", capsys)
    assert "--use_dora, --no_use_dora" in text and "--no_gradient_checkpointing" in text
    assert "--no-" not in text
    serve = _help("serve", capsys)
    assert "--api_key" in serve and "--api-key" not in serve
    assert "--no_no_" not in _help("eval", capsys)
