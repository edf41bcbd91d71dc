import pytest

from dart_ee.config import check_exit_lists, load_config, parse_config
from dart_ee.errors import ConfigError


def test_repo_configs_validate():
    from pathlib import Path

    for p in (Path(__file__).parents[1] / "configs").glob("*.yaml"):
        load_config(p)


def test_unknown_key_named():
    with pytest.raises(ConfigError, match=r"train\.epocs: unknown key"):
        parse_config({"train": {"epocs": 3}}, "x.yaml")


def test_wrong_type_named():
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        parse_config({"train": {"epochs": "many"}})


def test_exit_weight_length(tmp_path):
    cfg = parse_config({"train": {"exit_weights": [1, 1, 1]}})
    with pytest.raises(ConfigError, match="exit_weights has 3 entries but model 'alexnet' has 6 exits"):
        check_exit_lists(cfg, 6)


def test_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: a\ntrain:\n  epochs: 5\n")
    cfg = load_config(p, ["train.epochs=1", "train.bf16=false", "train.exit_weights=[1,2]", "data.dataset=mnist"])
    assert cfg.train.epochs == 1 and cfg.train.bf16 is False and cfg.train.exit_weights == [1, 2]
    assert cfg.data.dataset == "mnist"
    with pytest.raises(ConfigError, match="key=value"):
        load_config(p, ["train.epochs"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_adapt_lists_must_match():
    with pytest.raises(ConfigError, match="adapt: Value error, severities has 1 entries for 3 scenarios"):
        parse_config({"adapt": {"severities": [0.1]}})


@pytest.mark.parametrize("override, field", [("train.lr=.inf", "train.lr"), ("train.weight_decay=.nan", "train.weight_decay"),
                                             ("train.distill_temperature=.inf", "train.distill_temperature"),
                                             ("train.exit_weights=[1, .nan]", "train.exit_weights.1"),
                                             ("train.exit_weights=[1, -1]", "train.exit_weights.1"),
                                             ("calibration.max_drop=.nan", "calibration.max_drop")])
def test_non_finite_and_negative_numbers_named(override, field):
    with pytest.raises(ConfigError, match=rf"{field.replace('.', chr(92) + '.')}:"):
        load_config(None, [override])


def test_defaults_have_one_source():
    """The CLI shows the config classes' defaults, and the library's signatures agree with them."""
    import inspect

    from dart_ee.adapt import AdaptiveController, run_scenario
    from dart_ee.bench import benchmark
    from dart_ee.config import AdaptConfig, BenchmarkConfig

    b, a = BenchmarkConfig(), AdaptConfig()
    bench = inspect.signature(benchmark).parameters
    assert (bench["batch_size"].default, bench["n_images"].default, bench["repeats"].default,
            bench["latency_images"].default) == (b.batch_size, b.images, b.repeats, b.latency_images)
    ctrl = inspect.signature(AdaptiveController).parameters
    assert (ctrl["audit_share"].default, ctrl["shift_gate"].default, ctrl["shift_scale"].default) == \
        (a.audit_share, a.shift_gate, a.shift_scale)
    scen = inspect.signature(run_scenario).parameters
    assert (scen["n_clean"].default, scen["n_shift"].default, scen["batch_size"].default) == (a.clean, a.shifted, a.batch_size)


def test_a_field_added_at_its_default_keeps_every_runs_fingerprints():
    """train.optimizer came after runs were made: at its default ("sgd", what they did) it is not hashed."""
    from dart_ee.artifacts import fingerprint
    from dart_ee.config import _STEP_INPUTS, Config, config_fingerprint, step_fingerprint

    cfg = Config()
    before = cfg.model_dump(mode="json", include=_STEP_INPUTS["train"])
    before["train"].pop("optimizer")
    assert step_fingerprint(cfg, "train") == fingerprint({"fields": before})
    whole = cfg.model_dump(mode="json", exclude={"train": {"device"}})
    whole["train"].pop("optimizer")
    assert config_fingerprint(cfg) == fingerprint(whole)
    adamw = cfg.model_copy(update={"train": cfg.train.model_copy(update={"optimizer": "adamw"})})
    assert step_fingerprint(adamw, "train") != step_fingerprint(cfg, "train")  # a change of recipe still counts
