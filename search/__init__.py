"""The search application: the ``search`` CLI, the study spec, the trial pipeline, the study, the report."""
