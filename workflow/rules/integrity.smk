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
from snakemake.exceptions import WorkflowError


def _check_incomplete_whenever_checkpoints_add_jobs():
    if not hasattr(workflow, "_build_dag"):
        raise WorkflowError("workflow/rules/integrity.smk: this Snakemake has no Workflow._build_dag; "
                            "update the incomplete-file check for it")
    build = workflow._build_dag

    def build_dag():
        dag = workflow.dag
        for name in ("postprocess_after_update", "check_incomplete"):
            if not hasattr(dag, name):
                raise WorkflowError(f"workflow/rules/integrity.smk: this Snakemake's DAG has no {name}(); "
                                    f"update the incomplete-file check for it")
        postprocess = dag.postprocess_after_update

        async def check_then_postprocess():
            await dag.check_incomplete()  # raises, or (--rerun-incomplete) marks those jobs as forced
            await postprocess()           # ... which this update of the needrun state then sees

        dag.postprocess_after_update = check_then_postprocess
        build()

    workflow._build_dag = build_dag


if workflow.is_main_process:
    _check_incomplete_whenever_checkpoints_add_jobs()
