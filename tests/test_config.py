"""Configuration: defaults, overrides, and errors that name the file, line and field."""

from __future__ import annotations

import pytest
import yaml

from lidr.config import DEMO, Config, ConfigError, config_reference, dump_config, load_config


def test_demo_defaults_and_documented_keys():
    cfg = load_config()
    # Keys users and scripts rely on, by these names.
    assert cfg.model == "gemma-3-270m"
    assert cfg.languages.dominant == "en" and cfg.languages.others == ["es", "de", "fr"]
    assert cfg.prompts.source == "builtin:demo" and cfg.prompts.per_iteration >= 1
    assert cfg.iterations == 2
    assert cfg.generation.max_new_tokens > 0 and cfg.generation.batch_size > 0
    assert cfg.training.beta == 0.5 and cfg.training.nll_weight == 1.0
    assert cfg.training.learning_rate == DEMO["training"]["learning_rate"]
    assert cfg.training.lora is not None and cfg.seed == 0
    ref = config_reference()
    for key in ("model:", "dominant:", "per_iteration:", "max_new_tokens:", "nll_weight:", "lora:", "seed:"):
        assert key in ref


def test_file_and_set_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("languages:\n  others: [ru, ja]\ntraining:\n  lora: null\n  beta: 0.1\n")
    cfg = load_config(path, ["training.beta=0.25", "generation.batch_size=4", "iterations=3"])
    assert cfg.languages.others == ["ru", "ja"]
    assert cfg.training.lora is None  # null = full fine-tuning
    assert cfg.training.beta == 0.25 and cfg.generation.batch_size == 4 and cfg.iterations == 3
    # A file does not inherit the demo's overlay: paper defaults apply.
    assert cfg.training.learning_rate == 5e-7


def test_dump_round_trips(tmp_path):
    cfg = load_config(None, ["seed=7"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg
    assert yaml.safe_load(path.read_text())["training"]["lora"]["r"] == cfg.training.lora.r


def test_errors_name_file_line_and_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: gemma-3-270m\nlanguages:\n  others: [es, xx]\ntraining:\n  betta: 0.3\n  learning_rate: -1\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert f"{path}:3: field 'languages.others'" in msg and "unknown language code 'xx'" in msg
    assert "known codes:" in msg and "es" in msg  # lists the known ones
    assert f"{path}:5: field 'training.betta': unknown field" in msg
    assert f"{path}:6: field 'training.learning_rate'" in msg


@pytest.mark.parametrize(
    "override, needle",
    [
        ("iterations=0", "field 'iterations'"),
        ("languages.dominant=es", "also listed in others"),
        ("languages.others=[]", "at least one"),
        ("generation.dtype=int8", "field 'generation.dtype'"),
        ("nonsense", "expected key.sub=value"),
    ],
)
def test_bad_overrides(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "x.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    assert isinstance(Config(), Config)


def test_translation_limit_follows_the_source_length():
    gen = load_config(None, ["generation.max_new_tokens=96"]).generation
    assert gen.translation_tokens == 144
    assert gen.translation_limit(10) == 4 * 10 + 16  # a short text: cut early if it loops
    assert gen.translation_limit(100) == 144  # never past the stage's limit
    paper = load_config(None, ["generation.max_new_tokens=96", "generation.translation_length_ratio=null"]).generation
    assert paper.translation_limit(10) == 144
