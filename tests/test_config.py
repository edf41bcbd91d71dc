import pytest

from dart_ee.config import check_exit_lists, load_config, parse_config
from dart_ee.core.errors import ConfigError


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


def test_adaptation_reports_only_on_families_its_settings_were_not_chosen_on():
    with pytest.raises(ConfigError, match="'noise' builds the development streams"):
        parse_config({"adapt": {"families": ["impulse", "noise"]}})
    with pytest.raises(ConfigError, match="unknown shift family 'fog'"):
        parse_config({"adapt": {"families": ["fog"]}})
    with pytest.raises(ConfigError, match="adapt.levels"):
        parse_config({"adapt": {"levels": [4]}})


def test_run_folders_of_the_first_adaptation_design_still_load():
    """Before 2026-11-26 a run's config.yaml held adapt.scenarios/severities and the controller's fields flat."""
    cfg = parse_config({"adapt": {"scenarios": ["noise", "blur", "contrast"], "severities": [0.1, 1.0, 0.7],
                                  "audit_share": 0.05, "shift_gate": 0.7, "clean": 100}})
    assert cfg.adapt.controller.audit_share == 0.05 and cfg.adapt.controller.shift_gate == 0.7 and cfg.adapt.clean == 100
    with pytest.raises(ConfigError, match="adapt.scenarios is gone"):
        parse_config({"adapt": {"scenarios": ["ramp"], "severities": [0.1]}})


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

    from dart_ee.adapt.controller import AdaptiveController
    from dart_ee.adapt.study import study
    from dart_ee.bench.benchmark import benchmark
    from dart_ee.config import AdaptConfig, BenchmarkConfig, ControllerSettings

    b, a, c = BenchmarkConfig(), AdaptConfig(), ControllerSettings()
    bench = inspect.signature(benchmark).parameters
    assert (bench["batch_size"].default, bench["n_images"].default, bench["repeats"].default,
            bench["latency_images"].default) == (b.batch_size, b.images, b.repeats, b.latency_images)
    ctrl = inspect.signature(AdaptiveController).parameters
    assert (ctrl["audit_share"].default, ctrl["shift_gate"].default, ctrl["shift_scale"].default, ctrl["window"].default,
            ctrl["update_every"].default, ctrl["z_gate"].default, ctrl["ucb"].default) == \
        (c.audit_share, c.shift_gate, c.shift_scale, c.window, c.update_every, c.z_gate, c.ucb)
    scen = inspect.signature(study).parameters
    assert (scen["n_clean"].default, scen["n_shift"].default, scen["batch_size"].default, list(scen["families"].default),
            list(scen["levels"].default)) == (a.clean, a.shifted, a.batch_size, a.families, a.levels)


def test_a_field_added_at_its_default_keeps_every_runs_fingerprints():
    """train.optimizer, train.max_steps, data.image_size/stream/workers, adapt.risk and calibration.inner_folds came
    after runs were made: at their defaults (what those runs did) they are not hashed."""
    from dart_ee.config import _STEP_INPUTS, Config, config_fingerprint, step_fingerprint
    from dart_ee.core.artifacts import fingerprint

    later = [("train", "optimizer"), ("train", "max_steps"), ("data", "image_size"), ("data", "stream"),
             ("data", "workers"), ("adapt", "risk"), ("calibration", "inner_folds")]
    cfg = Config()
    before = cfg.model_dump(mode="json", include=_STEP_INPUTS["train"])
    whole = cfg.model_dump(mode="json", exclude={"train": {"device"}})
    for section, field in later:
        before.get(section, {}).pop(field, None)
        whole[section].pop(field)
    assert step_fingerprint(cfg, "train") == fingerprint({"fields": before})
    assert config_fingerprint(cfg) == fingerprint(whole)
    for section, field, value in (("train", "optimizer", "adamw"), ("train", "max_steps", 5), ("data", "image_size", 64)):
        changed = cfg.model_copy(update={section: getattr(cfg, section).model_copy(update={field: value})})
        assert step_fingerprint(changed, "train") != step_fingerprint(cfg, "train"), field  # a change of recipe counts
    streamed = cfg.model_copy(update={"data": cfg.data.model_copy(update={"stream": True, "workers": 2})})
    assert step_fingerprint(streamed, "train") == step_fingerprint(cfg, "train")  # the same pixels, the same model


def test_ucb1_without_audits_is_refused():
    """UCB1's reward reads audited accuracy: without audits it would cut MACs blind."""
    with pytest.raises(ConfigError, match="ucb needs audits"):
        parse_config({"adapt": {"controller": {"ucb": True, "audit_share": 0}}})
