"""One night of the pipeline: the preflight, the steps in order, how the night ends.

``summaries`` types what each step reports and the outcome they add up to; ``preflight``
checks everything a night needs before anything is fetched or written; ``runner`` runs the
steps (directly, or each as a Prefect task), keeps a failure where it happens, records the night
and turns a signal into an ``interrupted`` night. Nothing here imports Prefect at module level.
"""
