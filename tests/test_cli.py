import subprocess
import sys

import yaml
from PIL import Image
from typer.testing import CliRunner

from comat.cli import app

COMMANDS = ["generate", "train", "eval", "ablate", "sensitivity", "attack", "report", "toy"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-c", "from comat.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=300)


def test_help_lists_every_command():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.output
    for sub in ["render", "pretrain", "eval-zoo"]:
        assert sub in CliRunner().invoke(app, ["toy", "--help"]).output


def test_shared_options_are_defined_once():
    for command in ["train", "eval", "ablate", "sensitivity", "attack"]:
        out = CliRunner().invoke(app, [command, "--help"]).output
        for option in ["--model", "--out", "--seed", "--device", "--config"]:
            assert option in out, (command, option)


def test_bad_input_is_one_line_without_traceback(tmp_path):
    result = run_cli("generate", "--model", str(tmp_path / "missing"), "--prompt", "a red circle")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error:") and "does not exist" in result.stderr
    result = run_cli("generate", "--prompts", str(tmp_path / "none.txt"))
    assert result.returncode == 2 and "prompt file" in result.stderr


def test_generate_writes_images_and_resolved_config(tiny_sd_dir, tmp_path):
    (tmp_path / "p.txt").write_text("a red circle\na blue square\n")
    (tmp_path / "c.yaml").write_text("steps: 2\nguidance: 3.0\n")
    out = tmp_path / "out"
    result = run_cli("generate", "--model", str(tiny_sd_dir), "--prompts", str(tmp_path / "p.txt"),
                     "--config", str(tmp_path / "c.yaml"), "--set", "size=32", "--seed", "3", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.glob("*.png")) == ["0000_3.png", "0001_3.png"]
    assert Image.open(out / "0000_3.png").size == (32, 32)
    resolved = yaml.safe_load((out / "config.resolved.yaml").read_text())
    assert resolved["config"]["steps"] == 2 and resolved["config"]["seed"] == 3
    assert resolved["config"]["prompts"] == ["a red circle", "a blue square"]
    assert resolved["environment"]["diffusers"]
