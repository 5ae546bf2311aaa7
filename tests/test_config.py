"""Config loading: one model, YAML plus overrides, errors that name the key and the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_core.config import ConfigError, load_config


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    cfg = load_config(_write(tmp_path, "name: calc\nrun_name: r1\nlake:\n  path: data/lake\n"))
    assert cfg.name == "calc"
    assert cfg.lake.path == (tmp_path / "data" / "lake").resolve()
    assert cfg.lake.catalog_path == cfg.lake.path / "catalog.duckdb"
    assert cfg.mlflow_uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"


def test_overrides_win_over_the_file_and_parse_as_yaml(tmp_path):
    cfg = load_config(_write(tmp_path, "collector:\n  port: 5000\n"), overrides=["collector.port=4319", "collector.token=abc"])
    assert cfg.collector.port == 4319
    assert cfg.collector.token == "abc"
    assert cfg.collector.url == "http://127.0.0.1:4319"


def test_unknown_key_names_the_key_the_file_and_a_suggestion(tmp_path):
    path = _write(tmp_path, "collector:\n  prot: 4318\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message and "collector.prot" in message and "did you mean 'port'" in message


@pytest.mark.parametrize("setting, instead", [
    ("algorithm: beam", "max_metric_calls (task evaluations) or max_rollouts, and minibatch_size"),
    ("rounds: 3", "max_metric_calls (task evaluations) or max_rollouts"),
    ("beam_width: 2", "max_metric_calls or max_rollouts"),
    ("branch_factor: 2", "minibatch_size"),
    ("failures: 4", "minibatch_size"),
])
def test_a_config_of_the_beam_search_is_refused_with_the_key_and_what_to_set_for_gepa(tmp_path, setting, instead):
    path = _write(tmp_path, f"prompt_optimization:\n  {setting}\n  tasks_per_eval: 8\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    key = setting.split(":")[0]
    assert message.startswith(f"{path}: prompt_optimization.{key}") and "Traceback" not in message
    assert "our beam search" in message and "replaced by GEPA (issue 73, see docs/config.md" in message
    assert instead in message
    with pytest.raises(ConfigError, match=f"prompt_optimization.{key}"):  # an override too
        load_config(None, overrides=[f"prompt_optimization.{key}={setting.split(': ')[1]}"])


def test_a_config_without_a_search_budget_runs_gepa_on_about_the_beam_searchs_default_spend(tmp_path):
    from lightning_core.apo import search as apo

    cfg = load_config(_write(tmp_path, "prompt_optimization:\n  algorithm: gepa\n"))
    assert cfg.prompt_optimization.algorithm == "gepa" == load_config(None).prompt_optimization.algorithm
    assert apo.gepa_budget(cfg) == 300  # 16 tasks x (1 + 3 rounds x 6 candidates) = 304 rollouts, the beam's default


def test_wrong_type_names_the_key_and_the_value(tmp_path):
    path = _write(tmp_path, "collector:\n  port: lots\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "collector.port" in str(err.value) and "'lots'" in str(err.value) and str(path) in str(err.value)


def test_bad_run_name_explains_the_allowed_characters(tmp_path):
    with pytest.raises(ConfigError, match="letters, digits"):
        load_config(_write(tmp_path, "run_name: 'my run/1'\n"))


def test_malformed_override_and_missing_file_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, overrides=["collector.port"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="mapping of settings"):
        load_config(_write(tmp_path, "- a\n- b\n"))


def test_a_config_extends_another_mapping_by_mapping_and_says_what_is_wrong_with_the_chain(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "name: rag\nrun_name: one\nrollouts:\n  dataset: one.jsonl\n  group_size: 8\n  resources: {k: 1, max_turns: 4}\n"
        "trainer:\n  learning_rate: 1.0e-3\nserving:\n  extra_args: [--a, --b]\n")
    sub = tmp_path / "stage"
    sub.mkdir()
    (sub / "sft.yaml").write_text("extends: ../base.yaml\nrun_name: two\nrollouts:\n  dataset: two.jsonl\n"
                                  "  resources: {max_turns: 5}\ntrainer:\n  mode: sft\nserving:\n  extra_args: [--c]\n")
    cfg = load_config(sub / "sft.yaml", overrides=["rollouts.group_size=4"])
    assert (cfg.name, cfg.run_name, cfg.trainer.mode, cfg.trainer.learning_rate) == ("rag", "two", "sft", 1.0e-3)
    assert cfg.rollouts.resources == {"k": 1, "max_turns": 5}  # mappings merge key by key
    assert cfg.serving.extra_args == ["--c"]  # a list replaces the base file's
    assert cfg.rollouts.group_size == 4  # overrides still come last
    assert cfg.rollouts.dataset == (sub / "two.jsonl").resolve()  # paths resolve from the loaded file's folder
    assert load_config(tmp_path / "base.yaml").run_name == "one"  # the base file alone is unchanged

    (sub / "lost.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"lost.yaml: extends: nowhere.yaml: config file not found"):
        load_config(sub / "lost.yaml")
    (sub / "a.yaml").write_text("extends: b.yaml\n")
    (sub / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match=r"makes a cycle \(.*a.yaml -> .*b.yaml -> .*a.yaml\)"):
        load_config(sub / "a.yaml")
    (sub / "odd.yaml").write_text("extends: [base.yaml]\n")
    with pytest.raises(ConfigError, match="extends: expected the path of the config file"):
        load_config(sub / "odd.yaml")


def test_null_in_a_config_that_extends_another_deletes_the_base_files_key(tmp_path):
    """A training-only key of the base's mapping (rag's chain_doc_bonus) can be taken out in the file that extends it,
    and a setting goes back to its default: null deletes, through a chain of files too."""
    (tmp_path / "base.yaml").write_text(
        "name: rag\nrollouts:\n  group_size: 4\n  resources: {k: 1, max_turns: 4, chain_doc_bonus: 0.1}\n"
        "tracking:\n  mlflow_uri: http://mlflow.example:5000\ntrainer:\n  sft_min_reward: 0.6\n")
    (tmp_path / "eval.yaml").write_text("extends: base.yaml\nrollouts:\n  group_size: null\n"
                                        "  resources: {chain_doc_bonus: null, k: 2}\ntracking: null\n"
                                        "trainer:\n  sft_min_reward: null\n")
    cfg = load_config(tmp_path / "eval.yaml")
    assert cfg.rollouts.resources == {"k": 2, "max_turns": 4}  # the key is gone, not None
    assert cfg.rollouts.group_size == 8 and cfg.tracking.mlflow_uri is None  # the defaults, not the base's values
    assert cfg.trainer.sft_min_reward is None  # null is this setting's own value (no threshold), not its default 1.0
    (tmp_path / "typo.yaml").write_text("extends: base.yaml\ntrainer:\n  sft_min_rewrd: null\n")
    with pytest.raises(ConfigError, match="unknown key 'trainer.sft_min_rewrd'"):  # a misspelt key is still reported
        load_config(tmp_path / "typo.yaml")
    (tmp_path / "last.yaml").write_text("extends: eval.yaml\nrollouts:\n  resources: {max_turns: 6}\n")
    assert load_config(tmp_path / "last.yaml").rollouts.resources == {"k": 2, "max_turns": 6}
    assert load_config(tmp_path / "base.yaml").rollouts.resources["chain_doc_bonus"] == 0.1  # the base is unchanged


def test_literal_values_are_not_parsed_as_yaml(tmp_path):
    cfg = load_config(None, overrides=[f"project_dir={tmp_path}"],
                      values={"collector.token": "Xy9 #long-secret-part", "gateway.host": "::", "lake.path": tmp_path / "a: b"})
    assert cfg.collector.token == "Xy9 #long-secret-part" and cfg.gateway.host == "::"
    assert cfg.lake.path == tmp_path / "a: b"


def test_a_cluster_executor_needs_its_address(tmp_path):
    with pytest.raises(ConfigError, match="rollouts.executor=dask needs rollouts.address"):
        load_config(None, overrides=[f"project_dir={tmp_path}", "rollouts.executor=dask"])
    with pytest.raises(ConfigError, match="rollouts.executor"):
        load_config(None, overrides=[f"project_dir={tmp_path}", "rollouts.executor=spark", "rollouts.address=x"])
    cfg = load_config(None, overrides=[f"project_dir={tmp_path}", "rollouts.executor=ray", "rollouts.address=auto"])
    assert (cfg.rollouts.executor, cfg.rollouts.address) == ("ray", "auto")
    assert load_config(None, overrides=[f"project_dir={tmp_path}"]).rollouts.executor == "local"


def test_sleep_mode_with_overlapping_epochs_is_refused_at_load_in_one_line_that_names_both_keys(tmp_path):
    # issue 51, finding 6: vLLM slept while the next epoch's rollouts called it (its /health still answered 200)
    path = _write(tmp_path, "serving:\n  sleep_mode: true\ntrainer:\n  max_staleness: 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: serving.sleep_mode")
    assert "trainer.max_staleness = 2" in message and "got {" not in message
    assert load_config(path, overrides=["trainer.max_staleness=0"]).serving.sleep_mode  # each alone is fine
    assert load_config(path, overrides=["serving.sleep_mode=false"]).trainer.max_staleness == 2


def test_traces_off_in_the_file_or_on_the_command_line_means_off(tmp_path):
    """YAML 1.1 reads a bare ``off`` as false: ``tracking.traces: off`` must still mean off, not a type error."""
    path = tmp_path / "config.yaml"
    path.write_text("tracking:\n  traces: off\n")
    assert load_config(path).tracking.traces == "off"
    assert load_config(None, overrides=["tracking.traces=off"]).tracking.traces == "off"
    assert load_config(None, overrides=["tracking.traces=sample"]).tracking.traces == "sample"
    with pytest.raises(ConfigError, match="tracking.traces"):
        load_config(None, overrides=["tracking.traces=on"])  # "on" is no setting of traces: all, sample or off
