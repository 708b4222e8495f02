"""hf_mae as a package: the config files it ships, addressable by name (one copy each: the checkout's
examples/configs and accelerate_configs are symlinks to them), `--config NAME` with flags that win, the `hf-mae`
console script / `python -m hf_mae`, and (slow) a wheel installed in a fresh venv, used from outside the checkout."""

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from hf_mae.cli import main
from hf_mae.named_configs import (
    ACCELERATE_CONFIGS_DIR,
    RECIPES_DIR,
    accelerate_config_names,
    accelerate_config_path,
    grid_names,
    grid_path,
    recipe_names,
    recipe_path,
)
from hf_mae.training import DataArguments, MAEFinetuningArguments, MAEPretrainingArguments, ModelArguments, parse_args

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = (ModelArguments, DataArguments, MAEPretrainingArguments)


# ----------------------------------------------------------------------------------------------------------------------
# The shipped files and their names
# ----------------------------------------------------------------------------------------------------------------------
def test_the_checkout_folders_are_the_package_folders():
    # one copy of each file: the folders users know are relative symlinks into the package
    for link, target in ((ROOT / "examples" / "configs", RECIPES_DIR), (ROOT / "accelerate_configs", ACCELERATE_CONFIGS_DIR)):  # fmt: skip
        assert link.is_symlink() and not os.path.isabs(os.readlink(link)), link
        assert link.resolve() == target.resolve()
    # every shipped file is a .yaml: what setup.py's package_data ships
    assert all(p.suffix == ".yaml" for folder in (RECIPES_DIR, ACCELERATE_CONFIGS_DIR) for p in folder.iterdir())


def test_names_resolve_to_the_shipped_files(tmp_path, monkeypatch):
    assert {"pretrain_mask90", "finetune_full", "linear_probe", "distill_seed_mask75"} <= set(recipe_names())
    assert "study_seed" not in recipe_names() and grid_names() == ["seed"]
    assert {"single_gpu", "multi_gpu", "multi_node", "fsdp2", "deepspeed_zero2", "cpu_2proc"} <= set(
        accelerate_config_names()
    )
    monkeypatch.chdir(tmp_path)  # outside the checkout
    assert (
        recipe_path("pretrain_mask90") == recipe_path("pretrain_mask90.yaml") == RECIPES_DIR / "pretrain_mask90.yaml"
    )
    assert grid_path("seed") == grid_path("study_seed") == RECIPES_DIR / "study_seed.yaml"
    assert accelerate_config_path("multi_gpu") == ACCELERATE_CONFIGS_DIR / "multi_gpu.yaml"
    # a file that exists is a path, even where its name is a shipped one's
    (tmp_path / "pretrain_mask90.yaml").write_text("mask_ratio: 0.6\n")
    assert recipe_path("pretrain_mask90.yaml") == Path("pretrain_mask90.yaml")
    assert recipe_path(tmp_path / "pretrain_mask90.yaml") == tmp_path / "pretrain_mask90.yaml"
    with pytest.raises(FileNotFoundError, match=r"no recipe named 'pretrain_mask95'.*recipes: distill_official"):
        recipe_path("pretrain_mask95")
    with pytest.raises(FileNotFoundError, match=r"recipe file configs/x.yaml not found; or give the name of one"):
        recipe_path("configs/x.yaml")
    with pytest.raises(FileNotFoundError, match=r"no study grid named 'sed'.*study grids: seed"):
        grid_path("sed")
    with pytest.raises(FileNotFoundError, match=r"accelerate configs: cpu_2proc, cpu_fsdp2, deepspeed_zero2"):
        accelerate_config_path("multi")


# ----------------------------------------------------------------------------------------------------------------------
# --config NAME, then flags that win
# ----------------------------------------------------------------------------------------------------------------------
def test_config_by_name_with_flags_that_win(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, data_args, args = parse_args(PRETRAIN, ["--config", "pretrain_mask90", "--output_dir", "x", "--bf16", "false"])
    assert args.mask_ratio == 0.9 and args.output_dir == "x" and not args.bf16  # flags win over the recipe
    assert args.num_train_epochs == 500 and data_args.dataset_name == "tiny-imagenet"  # the rest is the recipe's
    # anywhere among the flags, --config=PATH, and a flag named before it still wins
    own = tmp_path / "mine.yaml"
    own.write_text("mask_ratio: 0.6\nnum_train_epochs: 50\noutput_dir: o\n")
    _, _, args = parse_args(PRETRAIN, ["--mask_ratio", "0.7", f"--config={own}"])
    assert (args.mask_ratio, args.num_train_epochs) == (0.7, 50)
    # the examples' positional form: a path, or a shipped recipe's file name from anywhere
    _, _, args = parse_args(PRETRAIN, ["pretrain_mask50.yaml", "--output_dir", "y", "--bf16", "false"])
    assert args.mask_ratio == 0.5
    model_args, _, args = parse_args(
        (ModelArguments, DataArguments, MAEFinetuningArguments),
        ["--config", "finetune_small", "--model_name_or_path", "pt", "--bf16", "false"],
    )
    assert args.finetune_aug == "small" and model_args.model_name_or_path == "pt"


@pytest.mark.parametrize(
    "argv, error, message",
    [
        (["pretrain_mask90.yaml", "--config", "pretrain_mask50"], ValueError, "an argument file .* and --config"),
        (["--config", "pretrain_mask90", "--config", "x"], ValueError, "--config is given twice"),
        (["--output_dir", "x", "--config"], ValueError, "--config needs a recipe name or a file; recipes: distill"),
        (["--config", "pretrain_mask9"], FileNotFoundError, "no recipe named 'pretrain_mask9'"),
        (["--config", "finetune_full"], ValueError, "unknown key.*'finetune_aug'"),  # a recipe of another command
    ],
)
def test_config_flag_errors(argv, error, message):
    with pytest.raises(error, match=message):
        parse_args(PRETRAIN, argv)


# ----------------------------------------------------------------------------------------------------------------------
# The console script
# ----------------------------------------------------------------------------------------------------------------------
def test_console_script_dispatch(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("pretrain", "finetune", "linear-probe", "distill", "study", "convert", "accelerate-config"):
        assert f"  {command} " in out
    assert main([]) == 2
    assert main(["pretrian"]) == 2 and "unknown command 'pretrian'; commands: pretrain" in capsys.readouterr().err
    assert main(["accelerate-config", "multi_gpu"]) == 0
    assert capsys.readouterr().out.strip() == str(ACCELERATE_CONFIGS_DIR / "multi_gpu.yaml")
    assert main(["recipe", "seed"]) == 0 and capsys.readouterr().out.strip() == str(RECIPES_DIR / "study_seed.yaml")
    assert main(["recipe"]) == 0
    listing = capsys.readouterr().out
    assert "pretrain_mask90 " in listing and "study_seed " in listing
    assert (
        main(["accelerate-config", "multi"]) == 1
        and "cpu_2proc, cpu_fsdp2, deepspeed_zero2" in capsys.readouterr().err
    )
    assert main(["recipe", "nope"]) == 1 and "study grids: seed" in capsys.readouterr().err
    # each command's own --help (linear_probe spelled either way)
    for argv, expected in (
        (["linear_probe", "--help"], "--layer_decay"),
        (["pretrain", "--help"], "--config NAME_OR_PATH"),
        (["study", "--help"], "--executor {local,submitit}"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0 and expected in capsys.readouterr().out, argv
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    assert "--source" in capsys.readouterr().out
    # an error a user can act on: one message, exit code 1
    assert main(["pretrain", "--config", "pretrain_mask90", "--mask_ratoi", "0.5"]) == 1


def test_python_m_hf_mae_from_outside_the_checkout(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "hf_mae", "accelerate-config", "cpu_2proc"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == ACCELERATE_CONFIGS_DIR / "cpu_2proc.yaml"


# ----------------------------------------------------------------------------------------------------------------------
# A wheel in a fresh venv
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_wheel_installed_in_a_fresh_venv_works_outside_the_checkout(tmp_path):
    # build from a copy of what the wheel needs, so that the checkout gets no build/ or *.egg-info
    source = tmp_path / "source"
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "hf_mae", source / "hf_mae", ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    pip = [sys.executable, "-m", "pip"]
    # this interpreter's setuptools when it has one (offline); else pip's isolated build fetches it
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    subprocess.run([*pip, "wheel", "--no-deps", *isolation, "-q", "-w", dist, source], check=True, timeout=600)
    (wheel,) = dist.glob("hf_mae-*.whl")
    import zipfile

    shipped = set(zipfile.ZipFile(wheel).namelist())
    for folder, names in (("recipes", [*recipe_names(), "study_seed"]), ("accelerate_configs", accelerate_config_names())):  # fmt: skip
        assert {f"hf_mae/{folder}/{n}.yaml" for n in names} <= shipped, folder
    assert "hf_mae/metrics/topk_accuracy/topk_accuracy.py" in shipped
    # a fresh venv; the heavy dependencies (torch, transformers, ...) from this interpreter's site-packages through a
    # .pth (appended to sys.path, its own .pth files unprocessed: no editable hf_mae from there)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    (Path(site) / "_heavy_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([*pip, "--python", python, "install", "--no-deps", "-q", wheel], check=True, timeout=600)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}")

    def hf_mae(*argv):
        done = subprocess.run(["hf-mae", *map(str, argv)], capture_output=True, text=True, env=env, cwd=work,
                              timeout=600)  # fmt: skip
        assert done.returncode == 0, (argv, done.stdout[-2000:], done.stderr[-4000:])
        return done.stdout

    where = subprocess.run([python, "-c", "import hf_mae; print(hf_mae.__file__)"], capture_output=True, text=True,
                           env=env, cwd=work, check=True).stdout  # fmt: skip
    assert where.startswith(site), where  # the installed wheel, not this checkout
    assert "linear-probe" in hf_mae("--help")
    path = Path(hf_mae("accelerate-config", "multi_gpu").strip())
    assert path.is_relative_to(site) and yaml.safe_load(path.read_text())["distributed_type"] == "MULTI_GPU"
    assert "--source" in hf_mae("convert", "--help") and "--executor" in hf_mae("study", "--help")
    hf_mae("pretrain", "--config", "pretrain_mask90", "--dataset_name", "digits", "--preset", "demo-tiny-32",
           "--max_steps", "2", "--output_dir", work / "pt", "--bf16", "false", "--report_to", "none",
           "--per_device_train_batch_size", "16", "--max_train_samples", "64", "--max_eval_samples", "32",
           "--dataloader_num_workers", "0")  # fmt: skip
    config = yaml.safe_load((work / "pt" / "config.json").read_text())
    assert config["mask_ratio"] == 0.9  # the recipe's, the flags over it
    plan = hf_mae("study", "--grid", "seed", "--scale", "full", "--dry-run", "--only", "mae_mask90-small")
    assert f"--config_file {site}" in plan and "2 runs" in plan
    done = subprocess.run([python, "-m", "hf_mae", "recipe", "finetune_full"], capture_output=True, text=True,
                          env=env, cwd=work, check=True)  # fmt: skip
    assert Path(done.stdout.strip()).is_relative_to(site)
