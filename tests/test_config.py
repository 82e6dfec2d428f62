import subprocess
import sys

import pytest

from learner.config import ConfigError, load_config, load_prompts, valid_keys
from learner.main import main


def test_defaults_and_overrides(tmp_path):
    config = load_config([])
    assert config.model.path == "minicarve/weights/sft-short" and config.sampling.eta == 1.0
    yaml = tmp_path / "c.yaml"
    yaml.write_text("train:\n  epochs: 7\nrollout:\n  num_workers: 2\n")
    config = load_config(["--config", str(yaml), "train.epochs=3"])
    assert config.train.epochs == 3 and config.rollout.num_workers == 2


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        load_config(["train.epoch=3"])
    assert "unknown config key 'train.epoch'" in str(err.value)
    assert "train.epochs" in str(err.value) and "train.learning_rate" in str(err.value)
    with pytest.raises(ConfigError, match="unknown config key 'bogus'"):
        load_config(["bogus=1"])


def test_wrong_type_is_rejected():
    with pytest.raises(ConfigError, match="wrong type for 'train.epochs'.*train.samples_per_epoch"):
        load_config(["train.epochs=many"])
    with pytest.raises(ConfigError, match="wrong type for 'sampling.eta'"):
        load_config(["sampling.eta=high"])


@pytest.mark.parametrize("override, message", [
    ("sampling.eta=0", "sampling.eta must be > 0"),
    ("sampling.guidance_scale=0.5", "guidance_scale must be >= 1"),
    ("train.samples_per_epoch=10", "multiple of rollout.batch_size"),
    ("train.num_minibatches=2", "must be 1 for ddpo-sf"),
    ("model.finetune=half", "model.finetune must be 'lora' or 'full'"),
    ("model.path=/does/not/exist", "is not a directory"),
])
def test_ranges_and_relations(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config([override])


def test_empty_prompt_list(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n")
    config = load_config([f"prompts.file={empty}"])
    with pytest.raises(ConfigError, match="holds no prompts"):
        load_prompts(config.prompts)
    with pytest.raises(ConfigError, match="not found"):
        load_prompts(load_config([f"prompts.file={tmp_path / 'missing.txt'}"]).prompts)


def test_bundled_prompts_load():
    assert len(load_prompts(load_config(["prompts.file=data/dreamfusion_prompts.txt",
                                         "prompts.limit=null"]).prompts)) == 415


def test_cli_rejects_bad_config_before_starting_anything(capsys, tmp_path):
    assert main(["train.epoch=3"]) == 2
    assert "unknown config key 'train.epoch'" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main([f"prompts.file={empty}", f"run.output_dir={tmp_path}/runs"]) == 1
    assert "holds no prompts" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing was created, no Ray was started


def test_help_lists_keys():
    out = subprocess.run([sys.executable, "-m", "learner.main", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "train.epochs" in out.stdout
    assert set(valid_keys()) >= {"model.path", "reward.kind", "faults.nonfinite_reward_fraction"}


def test_default_yaml_matches_the_dataclass_defaults():
    from learner.config import PROJECT_ROOT, Config, to_yaml

    text = (PROJECT_ROOT / "configs" / "default.yaml").read_text()
    body = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    assert body.strip() == to_yaml(Config()).strip(), "regenerate configs/default.yaml"


# Recipes for downloaded weights: here only their two paths may be wrong (tests/test_mvdream_lgm_run.py
# runs them with tiny models in the same layouts).
EXTERNAL_WEIGHTS = {"mvdream_lgm.yaml": ("model.path", "reward.reconstructor_options.weights")}


def test_shipped_configs_load():
    from learner.config import PROJECT_ROOT

    for path in sorted((PROJECT_ROOT / "configs").glob("*.yaml")):
        if path.name not in EXTERNAL_WEIGHTS:
            load_config(["--config", str(path)])
            continue
        with pytest.raises(ConfigError) as error:
            load_config(["--config", str(path)])
        problems = str(error.value).splitlines()[1:]
        assert sorted(line.split()[1].rstrip(":") for line in problems) == sorted(EXTERNAL_WEIGHTS[path.name]), problems
