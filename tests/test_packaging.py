"""pyproject.toml and environment.yml name the same packages (faiss-gpu stands in for faiss-cpu)."""
import re
import tomllib

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
