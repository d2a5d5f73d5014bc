"""Hostile settings: interpolations that do not resolve, resolvers that would copy the environment
(a secret) into config.yaml and W&B, and W&B project names W&B refuses: each is one error line
(exit 2) before anything is written; interpolations of the config's own keys keep working."""
from __future__ import annotations

import pytest

from common.exit_status import run_entry_point
from omegaconf import OmegaConf

from common.errors import UserInputError
from conftest import one_error_line, train_in_process
from train.config import DEFAULT_RECIPE, load_config, read_saved_config

SENTINEL = "sentinel-secret-6f1c2e"  # what WANDB_API_KEY holds in these tests
QUICK = ["model=test_resnet", "epochs=1", "eval_robust=false", "data.workers=0", "image_log_every=0"]


def files_holding(folder, text: str) -> list[str]:
    return [str(path) for path in folder.rglob("*") if path.is_file() and text.encode() in path.read_bytes()]


def test_a_recipe_reading_the_environment_is_refused_and_leaks_nothing(few_digits, tmp_path):
    recipe = tmp_path / "shared.yaml"
    recipe.write_text("name: run-${oc.env:WANDB_API_KEY}\nmodel: test_resnet\n")
    run_dir = tmp_path / "run"
    result = train_in_process(f"config={recipe}", f"data.root={few_digits}", f"output_dir={run_dir}",
                              "tracker=wandb", check=False, env={"WANDB_API_KEY": SENTINEL})
    line = one_error_line(result)
    assert f"config file {recipe}: name:" in line and "calls the resolver oc.env, refused" in line
    assert SENTINEL not in result.stdout + result.stderr
    assert not run_dir.exists() and files_holding(tmp_path, SENTINEL) == []


@pytest.mark.parametrize("override, resolver", [
    ("wandb_group=${oc.env:WANDB_API_KEY}", "oc.env"),
    ("data.root=${oc.env:HOME,/data}", "oc.env"),
    ("name=${oc.decode:${oc.env:WANDB_API_KEY}}", "oc.env"),  # nested: the inner call is named
    ("attack.eps=${oc.select:seed}", "oc.select"),
    ("wandb_group=${oc.deprecated:name}", "oc.deprecated"),
    ("name=${my_resolver:x}", "my_resolver"),  # one nobody registered: refused all the same
])
def test_any_resolver_on_the_command_line_is_refused(override, resolver, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", SENTINEL)
    key = override.split("=")[0]
    refusal = rf"^command line: {key}: .* calls the resolver {resolver}, refused"
    with pytest.raises(UserInputError, match=refusal) as error:
        load_config([override, "tracker=none"])
    assert SENTINEL not in str(error.value)


def test_a_resolver_in_a_base_recipe_is_refused_naming_that_file(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("data: {root: '${oc.env:HOME}'}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nname: child\n")
    with pytest.raises(UserInputError, match=rf"^config file {base}: data.root: .* calls the resolver oc.env"):
        load_config([f"config={tmp_path / 'child.yaml'}"])


@pytest.mark.parametrize("override, key, problem", [
    ("wandb_group=${nonexistent.key}", "wandb_group", "Interpolation key 'nonexistent.key' not found"),
    ("name=${name}", "name", "Recursive interpolation detected"),
    ("seed=${seed}", "seed", "Recursive interpolation detected"),
    ("log_every=${name}", "log_every", "could not be converted to Integer"),
    # escaped: a literal '${oc.env:HOME}', which config.yaml, read back, would resolve
    ("wandb_group=\\${oc.env:HOME}", "wandb_group", "holds '${' once resolved"),
])
def test_an_interpolation_that_does_not_resolve_is_one_line_naming_the_key(override, key, problem, few_digits,
                                                                          tmp_path):
    result = train_in_process(override, f"data.root={few_digits}", f"output_dir={tmp_path / 'run'}", "tracker=none",
                              *QUICK, check=False)
    line = one_error_line(result)
    assert f"{key}: " in line and problem in line, line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override", ["name=${oc.env", "wandb_group=${}"])
def test_a_malformed_interpolation_is_one_line(override, few_digits, tmp_path):
    result = train_in_process(override, f"data.root={few_digits}", f"output_dir={tmp_path / 'run'}", "tracker=none",
                              *QUICK, check=False)
    assert "is not a valid interpolation" in one_error_line(result)


def test_interpolations_of_the_configs_own_keys_resolve_into_config_yaml(few_digits, tmp_path):
    """A recipe that refers to its own keys (and fgsm's step_size: ${.eps}) trains, and config.yaml
    and the checkpoint's config.yaml hold the values, no interpolation."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"base: {DEFAULT_RECIPE}\n"
                      "name: own-${model}-${seed}\nwandb_group: ${name}/${method}\nattack: fgsm\n")
    run_dir = tmp_path / "run"
    train_in_process(f"config={recipe}", f"data.root={few_digits}", f"output_dir={run_dir}", "tracker=none",
                     "attack.eps=3", *QUICK)
    for saved in (run_dir / "config.yaml", run_dir / "checkpoints" / "last" / "config.yaml"):
        assert "${" not in saved.read_text()
        cfg = read_saved_config(saved)
        assert (cfg.name, cfg.wandb_group) == ("own-test_resnet-0", "own-test_resnet-0/advprop")
        assert cfg.attack.eps == cfg.attack.step_size == 3.0  # fgsm: one full-ε step, after the override


def test_a_saved_config_edited_to_call_a_resolver_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", SENTINEL)
    saved = tmp_path / "config.yaml"
    saved.write_text("name: ${oc.env:WANDB_API_KEY}\n")
    with pytest.raises(UserInputError, match=rf"^{saved}: name: .* calls the resolver oc.env"):
        read_saved_config(saved)


def test_evaluate_attack_options_and_sweep_files_refuse_resolvers_too(tmp_path, monkeypatch):
    from tools.compare_methods import sweep_runs
    from tools.evaluate import parse_attack

    monkeypatch.setenv("WANDB_API_KEY", SENTINEL)
    with pytest.raises(UserInputError, match=r"^--attack pgd eps=\$\{oc.env:WANDB_API_KEY\}: eps: .* oc.env"):
        parse_attack(["pgd", "eps=${oc.env:WANDB_API_KEY}"])
    with pytest.raises(UserInputError, match=r"eps: .* does not resolve: Interpolation key 'nothing' not found"):
        parse_attack(["pgd", "eps=${nothing}"])
    assert parse_attack(["fgsm", "eps=2"])["attack"] is not None  # fgsm's own ${.eps} still resolves
    sweep = tmp_path / "sweep.yaml"
    OmegaConf.save({"recipe": "configs/demo.yaml", "common": ["name=${oc.env:WANDB_API_KEY}"], "runs": {"a": []}},
                   sweep)
    with pytest.raises(UserInputError, match=rf"^sweep file {sweep}: common.0: .* oc.env"):
        sweep_runs(sweep)


@pytest.mark.parametrize("given, project, problem", [
    ("a/b", "a/b", "cannot contain characters"), ("home-/root", "home-/root", "cannot contain characters"),
    ("p" * 200, "p" * 200, "exceeded 128 characters"), ("''", "", "it is empty"),
])
def test_a_project_name_wandb_refuses_is_one_line_before_anything_is_written(given, project, problem, few_digits,
                                                                            tmp_path):
    run_dir = tmp_path / "run"
    result = train_in_process(f"wandb_project={given}", f"data.root={few_digits}", f"output_dir={run_dir}",
                              "tracker=wandb", *QUICK, check=False)
    line = one_error_line(result)
    assert line.startswith(f"error: bad value for wandb_project: {project!r} ") and problem in line, line
    assert not run_dir.exists()
    assert load_config([f"wandb_project={given}", "tracker=none"]).wandb_project == project  # unused: fine


def test_evaluate_refuses_a_bad_wandb_project_before_evaluating(tmp_path, capsys):
    from tools.evaluate import main
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"never read")
    assert run_entry_point(main, [str(checkpoint), "--data", str(tmp_path), "--wandb-run", "--wandb-project", "a/b"]) == 2
    assert "error: --wandb-project 'a/b' is not a W&B project name" in capsys.readouterr().err
