"""A model directory with a config and a tokenizer but no weights (what a user has before downloading
5 GB, and what ../shared/models holds for Phi-2 and Phi-3.5): `plan --measure` measures it with random
weights and says so; commands that need the real weights refuse it by name."""
import shutil

from conftest import run_cli


def _config_only(tiny_models, arch, tmp_path):
    bare = tmp_path / f"{arch}-config-only"
    shutil.copytree(tiny_models[arch], bare, ignore=shutil.ignore_patterns("*.safetensors"))
    return bare


def test_plan_measure_builds_random_weights_from_a_config_only_dir(tiny_models, memorise_file, tmp_path, capfd):
    bare = _config_only(tiny_models, "phi3", tmp_path)
    assert run_cli("plan", "--model", bare, "--dataset_path", memorise_file, "--batch_size", 2, "--measure") == 0
    out, err = capfd.readouterr()
    assert "has no weight files" in err and "random weights" in err
    assert "measured" in out and "peak" in out


def test_train_refuses_a_config_only_dir_naming_it(tiny_models, memorise_file, tmp_path, capfd):
    bare = _config_only(tiny_models, "llama", tmp_path)
    code = run_cli("train", "--model", bare, "--dataset_path", memorise_file, "--output_dir", tmp_path / "run")
    err = capfd.readouterr().err
    assert code == 2, err
    assert str(bare) in err and "no weight files" in err and "Traceback" not in err
