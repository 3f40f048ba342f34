# DiGIT pipeline. Usage: see README.md. Rules live in workflow/rules/, one file per topic;
# each rule is a thin shell call into the `pipeline` package.
import os
import sys

sys.path.insert(0, workflow.basedir)
from pipeline.config import ConfigError, validate_config

if not workflow.overwrite_configfiles:  # no --configfile given: the tiny CPU demo
    configfile: os.path.join(workflow.basedir, "configs", "default.yaml")

try:
    config.update(validate_config(config))
    if "dataset" not in config:
        raise ConfigError("config key 'dataset' is missing: say which images to use")
except ConfigError as exc:
    raise WorkflowError(str(exc)) from None


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/integrity.smk"
include: "workflow/rules/shards.smk"
include: "workflow/rules/tokenizer.smk"
include: "workflow/rules/stage1.smk"
include: "workflow/rules/render.smk"
include: "workflow/rules/latents.smk"
include: "workflow/rules/evaluate.smk"


rule all:  # every output of every job (see all_targets in common.smk)
    input:
        all_targets,
    default_target: True
