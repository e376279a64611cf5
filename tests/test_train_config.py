"""TrainConfig: one dataclass -> CLI flags, YAML, SageMaker hyperparameters, form fields, all round-tripping."""
import dataclasses
import json

import pytest

from training.config import (PRESETS, TrainConfig, build_parser, check_hyperparameters, command, form_fields,
                             from_hyperparameters, parse_args, preset, to_argv, to_hyperparameters)


def _changed():
    return preset("llava-1.5-7b-qlora", lora_r=64, overwrite=True, data="s3://bucket/data/", max_steps=10,
                  lora_target=r".*language_model.*\.(q_proj|v_proj)", learning_rate=1.5e-4)


def test_every_field_has_a_flag_and_help_once():
    parser = build_parser()
    flags = {a.dest for a in parser._actions}
    for f in dataclasses.fields(TrainConfig):
        assert f.name in flags and f.metadata["help"]
    assert [f["name"] for f in form_fields()] == [f.name for f in dataclasses.fields(TrainConfig)]


def test_cli_flags_reproduce_the_config():
    cfg = _changed()
    assert parse_args(to_argv(cfg)) == cfg
    assert "--lora_r 64" in command(cfg)


def test_yaml_round_trips_and_flags_override_the_file(tmp_path):
    cfg = _changed()
    path = tmp_path / "run.yaml"
    cfg.to_yaml(path)
    assert TrainConfig.from_yaml(path) == cfg
    assert parse_args(["--config", str(path), "--lora_r", "8", "--overwrite", "false"]) == \
        cfg.replace(lora_r=8, overwrite=False)


def test_sagemaker_hyperparameters_are_strings_within_limits_and_parse_back():
    cfg = _changed()
    hp = to_hyperparameters(cfg)
    assert all(isinstance(v, str) for v in hp.values()) and len(hp) <= 100
    assert from_hyperparameters(hp) == cfg
    # what the training toolkit passes: `--name str(json.loads(value))`, e.g. booleans as "True"
    assert json.loads(hp["overwrite"]) is True and parse_args(["--overwrite", "True"]).overwrite is True


def test_hyperparameter_limits_are_checked():
    with pytest.raises(ValueError, match="2500"):
        check_hyperparameters({"lora_target": "x" * 2501})
    with pytest.raises(ValueError, match="at most 100"):
        check_hyperparameters({f"k{i}": "1" for i in range(101)})


def test_presets_are_valid_configs_with_the_seed_recipe():
    for name in PRESETS:
        assert isinstance(preset(name), TrainConfig)
    seed = preset("llava-1.5-7b-qlora")
    assert (seed.mode, seed.lora_r, seed.lora_alpha, seed.mm_projector_lr, seed.learning_rate, seed.lr_scheduler,
            seed.warmup_ratio, seed.max_length, seed.image_aspect_ratio, seed.deepspeed) == \
        ("qlora", 128, 256, 2e-5, 2e-4, "cosine", 0.03, 2048, "pad", "zero2")


def test_bad_values_are_refused_with_the_field_name():
    with pytest.raises(ValueError, match="mode"):
        TrainConfig.from_dict({"mode": "qlor"})
    with pytest.raises(ValueError, match="unknown TrainConfig keys: lora_rank"):
        TrainConfig.from_dict({"lora_rank": 8})
    with pytest.raises(SystemExit):
        parse_args(["--deepspeed", "zero4"])


def test_yaml_booleans_read_as_the_words_of_auto_true_false_fields():
    # train_config.yaml of runs made when packing was a bool holds `packing: false`; bf16 / tf32 likewise
    cfg = TrainConfig.from_yaml("packing: false\nbf16: true\ntf32: false\nfused_lora: false\n")
    assert (cfg.packing, cfg.bf16, cfg.tf32, cfg.fused_lora) == ("false", "true", "false", False)
    with pytest.raises(ValueError, match="mode"):
        TrainConfig.from_yaml("mode: true\n")


def test_the_optimizer_names_checked_before_loading_are_those_transformers_accepts():
    from transformers.training_args import OptimizerNames

    from training.config import OPTIMIZERS
    assert set(OPTIMIZERS) == {o.value for o in OptimizerNames}


def test_train_config_is_a_job_config_with_the_one_config_error():
    import charts.config
    import training.config

    assert issubclass(TrainConfig, charts.config.JobConfig)
    assert training.config.ConfigError is charts.config.ConfigError
    with pytest.raises(charts.config.ConfigError, match="lora_r: 3.5 is not an integer"):
        TrainConfig.from_dict({"lora_r": 3.5})          # not silently 3


def test_help_with_a_percent_sign_prints_as_written():
    text = " ".join(build_parser().format_help().split())
    assert "less memory, ~30% slower." in text and "option_strings" not in text
