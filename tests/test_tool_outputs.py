"""Every output path of every tool is checked before its work starts (tools/output_guard.py): a
folder where a file goes, a path under a file, on /proc or through a symlink loop, over what the
tool reads or inside a checkpoint is one error line (exit 2) and nothing is done; a folder that
does not exist yet is made."""
from __future__ import annotations

from pathlib import Path

import pytest

from common.errors import UserInputError
from common.exit_status import run_entry_point
from conftest import train_in_process


@pytest.fixture
def bad_places(tmp_path) -> dict[str, tuple[Path, str]]:
    """name → (a folder no tool can write into, words of the refusal)."""
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    loop = tmp_path / "loop"
    loop.symlink_to(tmp_path / "loop_back")
    (tmp_path / "loop_back").symlink_to(loop)
    return {"under a file": (a_file / "sub", f"{a_file} is a file, not a folder"),
            "on /proc": (Path("/proc/advprop_out"), "cannot be created in /proc"),
            "through a symlink loop": (loop / "sub", "a symlink loop")}


@pytest.fixture(scope="module")
def tiny_run(few_digits, tmp_path_factory) -> Path:
    """A finished one-epoch run of test_resnet: checkpoints and metrics.jsonl."""
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    train_in_process(f"data.root={few_digits}", f"output_dir={run_dir}", "model=test_resnet", "epochs=1",
                     "tracker=none", "eval_robust=false", "data.workers=0", "image_log_every=0")
    return run_dir


def refusal(capsys, code: int) -> str:
    """The one error line of a tool that returned `code` (2)."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


# ---------------------------------------------------------------------------------------------
# the helper

@pytest.mark.parametrize("place", ["under a file", "on /proc", "through a symlink loop"])
def test_the_guard_refuses_a_place_no_file_can_be_written(place, bad_places):
    from tools.output_guard import check_output_file, check_output_folder
    folder, words = bad_places[place]
    with pytest.raises(UserInputError) as error:
        check_output_file(folder / "x.json", overwrite=True, example="x.json")
    assert str(error.value).startswith(f"output {folder / 'x.json'}") and words in str(error.value)
    with pytest.raises(UserInputError) as error:
        check_output_folder(folder)
    assert str(error.value).startswith(f"output {folder}") and words in str(error.value)


def test_the_guard_accepts_a_folder_still_to_be_made_and_writes_nothing(tmp_path):
    from tools.output_guard import check_output_file, check_output_folder
    check_output_file(tmp_path / "new" / "deeper" / "x.json", overwrite=False, example="x.json")
    check_output_folder(tmp_path / "other" / "set")
    assert list(tmp_path.iterdir()) == []


def test_the_guard_refuses_outputs_inside_inputs_and_checkpoints(tmp_path):
    from tools.output_guard import check_output_file, check_output_folder
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "train_state.json").write_text("{}")
    with pytest.raises(UserInputError, match="inside the checkpoint folder"):
        check_output_file(tmp_path / "ckpt" / "sub" / "x.json", overwrite=True, example="x.json")
    with pytest.raises(UserInputError, match="inside the checkpoint folder"):
        check_output_folder(tmp_path / "ckpt" / "shards")
    with pytest.raises(UserInputError, match="inside the input"):
        check_output_folder(tmp_path / "data" / "shards", inputs=[tmp_path / "data"])


# ---------------------------------------------------------------------------------------------
# each tool checks before its work

def test_evaluate_checks_its_json_before_loading_or_evaluating_anything(tmp_path, capsys, bad_places):
    from tools.evaluate import main
    checkpoint = tmp_path / "weights.safetensors"
    checkpoint.write_bytes(b"never loaded: a refusal names the output, not this file")
    data = tmp_path / "val"
    data.mkdir()
    cases = [(tmp_path, f"output {tmp_path} is a folder"), (checkpoint, "is inside the input"),
             (data / "eval.json", f"is inside the input {data}"),
             *[(folder / "eval.json", words) for folder, words in bad_places.values()]]
    for json_path, words in cases:
        line = refusal(capsys, run_entry_point(main, [str(checkpoint), "--data", str(data), "--json", str(json_path)]))
        assert words in line, line
    assert not (tmp_path / "a_file").is_dir() and sorted(p.name for p in data.iterdir()) == []


def test_evaluate_checks_the_wandb_folder_before_evaluating(tmp_path, capsys, monkeypatch):
    from tools.evaluate import main
    (tmp_path / "wandb").write_text("a file where W&B keeps its folder")
    checkpoint = tmp_path / "weights.safetensors"
    checkpoint.write_bytes(b"never loaded")
    monkeypatch.chdir(tmp_path)  # a checkpoint outside a run folder logs under ./wandb
    line = refusal(capsys, run_entry_point(main, [str(checkpoint), "--data", str(tmp_path), "--wandb-run"]))
    assert "output wandb is a file" in line, line


def test_export_checks_before_loading_and_makes_a_missing_folder(tiny_run, tmp_path, capsys, bad_places):
    from tools.export import main
    best = tiny_run / "checkpoints" / "best"
    for folder, words in bad_places.values():
        line = refusal(capsys, run_entry_point(main, [str(best), str(folder / "model")]))
        assert words in line, line
    out = tmp_path / "exports" / "tiny" / "model"  # an export is a folder (timm's Hub layout)
    assert run_entry_point(main, [str(best), str(out)]) == 0 and (out / "model.safetensors").is_file()


def test_the_converters_check_before_converting(few_digits, tmp_path, capsys, bad_places):
    from tools.convert_ffcv import main as convert_ffcv
    from tools.convert_wds import main as convert_wds
    for folder, words in bad_places.values():
        line = refusal(capsys, run_entry_point(convert_ffcv, [str(few_digits / "val"), str(folder / "val.beton")]))
        assert words in line, line
        line = refusal(capsys, run_entry_point(convert_wds, [str(few_digits / "val"), str(folder / "set"), "--split",
                                                             "val"]))
        assert words in line, line


def test_check_images_checks_the_cache_it_fills(few_digits, capsys, monkeypatch):
    from tools.check_images import main
    monkeypatch.setenv("XDG_CACHE_HOME", "/proc/advprop_cache")
    line = refusal(capsys, run_entry_point(main, [str(few_digits / "val")]))
    assert "output /proc/advprop_cache/advprop-trainer/image-check" in line and "cannot be created in /proc" in line


def test_plot_run_checks_its_png_and_never_overwrites_the_metrics(tiny_run, tmp_path, capsys, bad_places):
    from tools.plot_run import main
    for out, words in [(tiny_run / "metrics.jsonl", "is inside the input"), (tmp_path, "is a folder"),
                       *[(folder / "run.png", words) for folder, words in bad_places.values()]]:
        line = refusal(capsys, run_entry_point(main, [str(tiny_run), "--out", str(out)]))
        assert words in line, line
    out = tmp_path / "plots" / "tiny.png"
    assert main([str(tiny_run), "--out", str(out)]) == 0 and out.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("tool, args", [
    ("bench_gpu", ["--dry-run", "--only", "versions", "--out"]),
    ("bench_loaders", ["--backends", "torchvision", "--cache-dir"]),
    ("compare_methods", ["--out"]),
])
def test_benchmarks_and_sweeps_check_their_folders_before_any_part_runs(tool, args, capsys, bad_places):
    import importlib
    main = importlib.import_module(f"tools.{tool}").main
    for folder, words in bad_places.values():
        line = refusal(capsys, run_entry_point(main, [*args, str(folder)]))
        assert words in line, line


def test_readme_figures_checks_the_readme_before_measuring(tmp_path, capsys, monkeypatch, bad_places):
    from tools import readme_figures

    def measure(*args, **kwargs):
        raise AssertionError("measured before the README was found writable")

    monkeypatch.setattr(readme_figures, "measure", measure)
    for readme, words in [(tmp_path / "missing.md", "does not exist"),
                          *[(folder / "README.md", words) for folder, words in bad_places.values()]]:
        line = refusal(capsys, run_entry_point(readme_figures.main, ["demo", "--pages", str(readme)]))
        assert words in line, line
