"""pyproject.toml and environment.yml name the same packages (faiss-gpu stands in for faiss-cpu);
the package (and its wheel) carries the config and metrics schemas."""
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import yaml

CONDA_NAMES = {"torch": "pytorch", "faiss-cpu": "faiss-gpu", "dask[array]": "dask"}


def _name(spec: str) -> str:
    return re.split(r"[<>=!~ ]", spec, maxsplit=1)[0].strip().lower()


def test_environment_yml_matches_pyproject(repo):
    deps = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((repo / "environment.yml").read_text())["dependencies"]
    conda = {_name(d) for d in env if isinstance(d, str)}
    pip = {_name(d) for d in next(d for d in env if isinstance(d, dict))["pip"]}
    missing = [d for d in deps if CONDA_NAMES.get(_name(d), _name(d)) not in conda | pip]
    assert not missing, f"environment.yml lacks {missing}"
    assert "faiss-cpu" not in conda | pip, "never both faiss-cpu and faiss-gpu in one env"


def test_default_install_has_no_slurm_plugin(repo):
    text = (repo / "pyproject.toml").read_text()
    deps = tomllib.loads(text)["project"]["dependencies"]
    assert not any("slurm" in d for d in deps), "the SLURM plugin slows Snakemake start-up: keep it out"


SCHEMAS = ("config.schema.yaml", "metrics.schema.yaml")


def test_schemas_ship_inside_the_package():
    from importlib.resources import files

    from pipeline.config import SCHEMA_PATH
    from pipeline.evaluate import METRICS_SCHEMA

    folder = files("pipeline") / "schemas"
    assert sorted(p.name for p in folder.iterdir() if p.name.endswith(".yaml")) == sorted(SCHEMAS)
    assert (SCHEMA_PATH.name, METRICS_SCHEMA.name) == SCHEMAS
    assert SCHEMA_PATH.parent == METRICS_SCHEMA.parent == Path(str(folder))


def test_wheel_holds_the_schemas(repo, tmp_path):
    """An installed pipeline (no checkout) still finds its schemas: the wheel carries them."""
    src = tmp_path / "src"
    shutil.copytree(repo / "pipeline", src / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(repo / name, src / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-q", "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert all(f"pipeline/schemas/{s}" in names for s in SCHEMAS), [n for n in names if "schema" in n]
