import dataclasses

import pytest
import yaml

from rlhf_toy.config import ConfigError, parse_config, save_config
from rlhf_toy.stages.sft import SFTStageConfig


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_precedence_defaults_then_yaml_then_flags(tmp_path):
    path = write(tmp_path, "learning_rate: 1.0e-4\nmax_steps: 7\n")
    cfg = parse_config(SFTStageConfig, ["--config", str(path), "--max_steps", "9"])
    assert cfg.learning_rate == 1e-4  # from YAML
    assert cfg.max_steps == 9  # the flag wins over YAML
    assert cfg.per_device_train_batch_size == SFTStageConfig().per_device_train_batch_size  # default


def test_unknown_yaml_key_names_file_and_nearest(tmp_path):
    path = write(tmp_path, "learnin_rate: 1.0e-4\n")
    with pytest.raises(
        ConfigError, match=r"c\.yaml: unknown key 'learnin_rate'; did you mean 'learning_rate'"
    ):
        parse_config(SFTStageConfig, ["--config", str(path)])


def test_unknown_flag_names_nearest():
    with pytest.raises(ConfigError, match=r"unknown flag --max_step; did you mean 'max_steps'"):
        parse_config(SFTStageConfig, ["--max_step", "3"])


def test_bad_type_and_missing_value_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="max_steps must be int"):
        parse_config(SFTStageConfig, ["--max_steps", "three"])
    with pytest.raises(ConfigError, match="needs a value"):
        parse_config(SFTStageConfig, ["--learning_rate"])
    with pytest.raises(ConfigError, match="does not exist"):
        parse_config(SFTStageConfig, ["--config", str(tmp_path / "nope.yaml")])
    with pytest.raises(ConfigError, match="expected a mapping"):
        parse_config(SFTStageConfig, ["--config", str(write(tmp_path, "- a\n- b\n"))])


def test_bool_flags_and_resolved_config_written(tmp_path):
    cfg = parse_config(
        SFTStageConfig, ["--use_lora", "--resume=false", "--output_dir", str(tmp_path / "run")]
    )
    assert cfg.use_lora is True and cfg.resume is False
    written = yaml.safe_load(save_config(cfg, cfg.output_dir).read_text())
    assert written == dataclasses.asdict(cfg)


def test_validate_rejects_bad_eval_fraction():
    with pytest.raises(ConfigError, match="eval_fraction"):
        parse_config(SFTStageConfig, ["--eval_fraction", "1.5"])


def test_empty_config_file_is_an_error_not_all_defaults(tmp_path):
    # All defaults would mean output_dir: runs/sft, resuming into a run the user has there.
    for text in ("", "# only a comment\n"):
        with pytest.raises(ConfigError, match=r"c\.yaml: the config file is empty"):
            parse_config(SFTStageConfig, ["--config", str(write(tmp_path, text))])


def test_config_file_that_is_not_utf8_names_line_and_column(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"seed: 1\nlearning_rate: 1\xe9-4\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:2: not UTF-8 text \(byte 0xe9 at column 17\)"):
        parse_config(SFTStageConfig, ["--config", str(path)])


def test_dtype_device_and_trainer_numbers_are_checked_when_parsed():
    with pytest.raises(
        ConfigError, match="dtype must be one of auto, float32, bfloat16-mixed, bfloat16, float16; got 'fp16'"
    ):
        parse_config(SFTStageConfig, ["--dtype", "fp16"])
    with pytest.raises(ConfigError, match="device must be one of auto, cpu, cuda, cuda:N, mps; got 'gpu'"):
        parse_config(SFTStageConfig, ["--device", "gpu"])
    with pytest.raises(ConfigError, match="per_device_train_batch_size must be >= 1, got -4"):
        parse_config(SFTStageConfig, ["--per_device_train_batch_size", "-4"])
    with pytest.raises(ConfigError, match="learning_rate must be > 0"):
        parse_config(SFTStageConfig, ["--learning_rate", "0"])
    with pytest.raises(ConfigError, match="max_steps must be"):
        parse_config(SFTStageConfig, ["--max_steps", "0"])
    from rlhf_toy.stages.ppo.config import PPOStageConfig

    with pytest.raises(ConfigError, match="batch_size must be >= 1, got 0"):
        parse_config(PPOStageConfig, ["--batch_size", "0"])
    assert parse_config(SFTStageConfig, ["--dtype", "float16", "--device", "cpu"]).dtype == "float16"


def test_a_bad_value_is_one_line_on_the_command_line_and_writes_nothing(tmp_path, run_script):
    out = tmp_path / "run"
    result = run_script(
        "sft",
        "--config",
        "configs/tiny/sft.yaml",
        "--output_dir",
        out,
        "--per_device_train_batch_size",
        "-1",
        check=False,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr == "error: per_device_train_batch_size must be >= 1, got -1\n"
    assert not out.exists()
