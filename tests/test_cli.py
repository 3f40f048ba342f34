"""The command table: every command parses, lists in DAG order, and calls a function that exists."""
import ast
import importlib
import re
import subprocess
import sys

import pytest

from pipeline import cli

DAG_ORDER = ["init", "shards", "train-encoder", "features", "kmeans", "tokens", "train-vq", "vq-tokens", "train-kl",
             "kl-latents", "train", "sample", "probe", "render", "render-latents", "reference", "score", "stability",
             "report", "inspect", "config"]


def test_help_lists_the_stages_in_dag_order():
    out = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True, text=True).stdout
    positions = [re.search(rf"\n    {name}\s", out).start() for name in DAG_ORDER]
    assert positions == sorted(positions), out
    assert [c.name for c in cli.COMMANDS] == DAG_ORDER


def test_every_command_calls_an_existing_stage_function():
    """The runners import lazily; resolve each of their imports now (a renamed stage fails here)."""
    tree = ast.parse(open(cli.__file__).read())
    runners = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name.startswith("run_")}
    assert {c.run.__name__ for c in cli.COMMANDS} <= set(runners)
    for name, fn in runners.items():
        for node in ast.walk(fn):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                module = importlib.import_module(f"pipeline.{node.module}")
                for a in node.names:
                    assert hasattr(module, a.name), f"{name}: pipeline.{node.module} has no {a.name}"


@pytest.mark.parametrize("command", [c.name for c in cli.COMMANDS])
def test_each_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    assert next(c.description for c in cli.COMMANDS if c.name == command).split()[0] in capsys.readouterr().out


def test_settings_of_a_stage(capsys):
    assert cli.main(["config", "--config", "configs/smoke.yaml", "--settings", "tokens"]) == 0
    out = capsys.readouterr().out
    assert "changes the output" in out and "views:" in out and "batch_size" in out.split("runtime only")[1]
    assert cli.main(["config", "--config", "configs/smoke.yaml", "--settings", "nonsense"]) == 2
    assert "unknown stage 'nonsense'" in capsys.readouterr().err


def test_a_bad_override_names_itself(capsys):
    assert cli.main(["config", "--config", "configs/smoke.yaml", "--set", "train.stepz"]) == 2
    assert "override 'train.stepz' must look like key.sub=value" in capsys.readouterr().err
