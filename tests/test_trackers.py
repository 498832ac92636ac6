"""--report_to: TensorBoard event files hold the logged scalars; missing tracker packages are named."""
import importlib.util
import json

import pytest

from conftest import MEMORISE, run_cli, write_jsonl
from phitune.config import TrainArgs
from phitune.errors import ConfigError, PhituneError
from phitune.training.trackers import check_installed


def _scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    found = {}
    for events in logdir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            found.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return found


def test_tensorboard_holds_loss_lr_grad_norm_speed_and_validation(tiny_models, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", MEMORISE * 3)
    out = tmp_path / "run"
    code = run_cli("train", "--model", tiny_models["llama"], "--dataset_path", data, "--output_dir", out,
                   "--max_steps", 3, "--batch_size", 2, "--gradient_accumulation_steps", 1, "--max_length", 64,
                   "--val_split", 0.25, "--eval_steps", 2, "--report_to", "tensorboard", "--run_name", "tb-test")
    assert code == 0
    logdir = out / "tensorboard" / "tb-test"
    assert logdir.is_dir()
    scalars = _scalars(logdir)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
        assert [s for s, _ in sorted(scalars[key])] == [1, 2, 3], key
        assert [v for _, v in sorted(scalars[key])] == pytest.approx([r[key] for r in train_rows], rel=1e-5)
    val_rows = [r for r in rows if "val_loss" in r]
    assert [s for s, _ in sorted(scalars["val_loss"])] == [r["step"] for r in val_rows] == [2, 3]
    assert [v for _, v in sorted(scalars["val_loss"])] == pytest.approx([r["val_loss"] for r in val_rows], rel=1e-5)
    # the run configuration is stored with the run (hparams plugin data)
    hparams = list(logdir.rglob("hparams.yml"))
    assert hparams and "learning_rate" in hparams[0].read_text()


def test_unknown_tracker_is_a_config_error():
    with pytest.raises(ConfigError, match="report_to: unknown tracker comet.*tensorboard, trackio, wandb, mlflow"):
        TrainArgs(report_to=["tensorboard", "comet"])
    assert TrainArgs(report_to="tensorboard,wandb").report_to == ["tensorboard", "wandb"]


@pytest.mark.parametrize("name", ["wandb", "mlflow", "trackio"])
def test_missing_tracker_package_is_named(name):
    if importlib.util.find_spec(name) is not None:
        pytest.skip(f"{name} is installed here")
    with pytest.raises(PhituneError, match=f"report_to: {name} needs the package.*pip install {name}"):
        check_installed([name])


def test_missing_tracker_fails_before_training(tiny_models, tmp_path, capsys):
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    data = write_jsonl(tmp_path / "d.jsonl", MEMORISE)
    code = run_cli("train", "--model", tiny_models["llama"], "--dataset_path", data, "--output_dir", tmp_path / "r",
                   "--max_steps", 1, "--report_to", "tensorboard", "wandb")
    assert code == 2
    err = capsys.readouterr().err
    assert "wandb" in err and "pip install wandb" in err and "Traceback" not in err
    assert not (tmp_path / "r" / "final_adapter").exists()
