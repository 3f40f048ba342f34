# Snakemake's guarantee that a job killed half-way is rerun, kept for the jobs behind the `shards`
# checkpoint (a workaround; found with Snakemake 9.27.1, see README "Running").
#
# Snakemake looks for incomplete outputs (files of a job that started and never finished: killed,
# node lost) once, at the start of DAG building (DAG.init -> check_incomplete). With a checkpoint
# whose output already exists, every job behind it is added only afterwards
# (update_checkpoint_dependencies): at DAG.init, `checkpoints.shards.get()` raises for every input
# function, so the DAG holds just `all` and `shards`. A centroids.npy or token shard left by a
# killed job therefore counted as complete, and `--rerun-incomplete` did nothing either.
# Here the same check runs again whenever the checkpoint adds jobs to the DAG (when the DAG is
# built, and at run time after `shards` ran): without --rerun-incomplete Snakemake stops and names
# the files (IncompleteFilesException); with it those jobs are rerun. --ignore-incomplete still
# skips the check; jobs of a cluster run (which Snakemake starts with --ignore-incomplete) are
# left alone.
from snakemake.logging import logger


def _cannot_check(what):
    """A Snakemake without the internals this relies on: say so loudly, run without the check."""
    logger.warning(f"workflow/rules/integrity.smk: this Snakemake has no {what}, so jobs killed half-way "
                   f"behind the shards checkpoint are NOT detected; run with --rerun-incomplete after a kill "
                   f"and update this file for this Snakemake version")


def _check_incomplete_whenever_checkpoints_add_jobs():
    if not hasattr(workflow, "_build_dag"):
        return _cannot_check("Workflow._build_dag")
    build = workflow._build_dag

    def build_dag():
        dag = workflow.dag
        missing = [n for n in ("postprocess_after_update", "check_incomplete") if not hasattr(dag, n)]
        if missing:
            _cannot_check(f"DAG.{missing[0]}()")
            return build()
        postprocess = dag.postprocess_after_update

        async def check_then_postprocess():
            await dag.check_incomplete()  # raises, or (--rerun-incomplete) marks those jobs as forced
            await postprocess()           # ... which this update of the needrun state then sees

        dag.postprocess_after_update = check_then_postprocess
        build()

    workflow._build_dag = build_dag


if workflow.is_main_process:
    _check_incomplete_whenever_checkpoints_add_jobs()
