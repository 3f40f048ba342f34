"""The README tells the truth: its cheap command lines run, and its SLURM table is the profile's.

Commands that need a finished run (`inspect` on artifacts) are checked by the slow end-to-end test
on the smoke run (``check_inspect_lines``); the cluster lines need the SLURM plugin (the SLURM test).
"""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def bash_lines() -> list[str]:
    """Every command line of the README's bash blocks, comments stripped."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line:
                lines.append(line)
    return lines


def run(args: list[str], cwd: Path = REPO) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_quick_start_commands_are_make_targets():
    assert bash_lines()[:2] == ["make demo", "make test"]
    for target in ("demo", "test"):
        run(["make", "-n", target])


def test_local_snakemake_lines_plan_without_error(tmp_path):
    """Every `.venv/bin/snakemake` line of the README, as a dry run (-n) in a scratch directory."""
    lines = [line for line in bash_lines() if line.startswith(".venv/bin/snakemake")]
    assert len(lines) >= 5
    for i, line in enumerate(lines):
        args = shlex.split(line)[1:]
        if "configs/mine.yaml" in args:          # made by `pipeline init`: tests/test_init.py plans it
            continue
        args = [str(REPO / a) if a.startswith(("configs/", "workflow/")) else a for a in args]
        work = tmp_path / f"w{i}"
        work.mkdir()
        run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(work), "-n",
             *args])


@pytest.mark.parametrize("args", [
    ["-m", "pipeline", "--help"],
    ["-m", "pipeline.metrics", "--help"],
    ["-m", "pipeline", "config", "--config", "configs/default.yaml"],
    ["-m", "pipeline", "config", "--schema"],
    ["-m", "pipeline", "config", "--config", "configs/default.yaml", "--settings", "train-stage2-nar"],
])
def test_cli_lines_the_readme_names(args):
    run([sys.executable, *args])


def test_every_command_has_help():
    from pipeline.cli import COMMANDS

    listing = run([sys.executable, "-m", "pipeline", "--help"]).stdout
    for command in COMMANDS:
        assert command.name in listing
        run([sys.executable, "-m", "pipeline", command.name, "--help"])


def check_inspect_lines(workdir: Path, run_name: str, dataset: str) -> int:
    """Run the README's `inspect` lines on a finished run in ``workdir`` (the paths of the default
    run mapped to ``run_name`` / ``dataset``); returns how many ran."""
    n = 0
    for line in bash_lines():
        if " inspect " not in line or "PATH" in line:
            continue
        args = shlex.split(line)[1:]
        args = [a.replace("results/default", f"results/{run_name}").replace("reports/default", f"reports/{run_name}")
                .replace("shards/fashion_mnist", f"shards/{dataset}") for a in args]
        proc = run([sys.executable, *args], cwd=workdir)
        assert proc.stdout.strip(), line
        n += 1
    return n


def _profile_rows() -> dict[str, tuple[str, str, str, str]]:
    prof = yaml.safe_load((REPO / "workflow" / "profiles" / "slurm" / "config.yaml").read_text())
    default = prof["default-resources"]
    rows = {}
    for rule, res in prof["set-resources"].items():
        mem = eval(str(res.get("mem_mb", default["mem_mb"])), {}, {"attempt": 1})
        minutes = res.get("runtime", default["runtime"])
        cpus = (str(res["cpus_per_task"]) if "cpus_per_task" in res else
                f"{res['cpus_per_gpu']} per GPU" if "cpus_per_gpu" in res else "its threads (1)")
        time = f"{minutes // 60} h" if minutes >= 60 else f"{minutes} min"
        rows[rule] = (res.get("slurm_partition", default["slurm_partition"]), cpus, f"{mem // 1000} GB", time)
    return rows


def test_slurm_table_is_the_profile():
    section = README[README.index("| rule | partition | CPUs | memory | time |"):]
    table = {}
    for line in section.splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rule = re.match(r"`(\w+)`", cells[0]).group(1)
        table[rule] = tuple(cells[1:])
    assert table == _profile_rows()


def test_rules_all_have_slurm_resources():
    """Every rule of the workflow but `all` has its line in the profile (and so in the README)."""
    rules = set()
    for smk in (REPO / "workflow" / "rules").glob("*.smk"):
        rules |= set(re.findall(r"^(?:rule|checkpoint) (\w+):", smk.read_text(), re.M))
    assert rules == set(_profile_rows()), sorted(rules ^ set(_profile_rows()))


def test_quoted_config_errors_are_the_real_ones():
    """The validation messages the README quotes are what validate_config says."""
    from pipeline.config import ConfigError, validate_config

    cases = [
        {"dataset": {"name": "d", "source": "fashion_mnist"}, "encoder": {"checkpoint": "w.pth", "train": {}}},
        {"dataset": {"name": "d", "source": "imagefolder", "splits": ["train", "val"]},
         "probe": {"test_split": "test"}},
    ]
    for config in cases:
        with pytest.raises(ConfigError) as err:
            validate_config(config)
        message = str(err.value).splitlines()[-1].strip()
        assert f"\n{message}\n" in README, message
