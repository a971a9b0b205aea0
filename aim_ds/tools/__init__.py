"""The `aim-ds` command line and its subcommands' own modules.

cli        the console script: one subcommand per module (`aim-ds`, `python -m aim_ds.tools.cli`)
replay     `aim-ds replay`: the merge controller re-run offline on a run's trajectory
estimate   `aim-ds estimate-memory`: model-state memory per GPU and node with and without the plugin
"""
