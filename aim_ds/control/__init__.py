"""The pure layer: what decides, with no torch, no DeepSpeed and no collectives.

controller   the merge controller (signals in, decisions out, on rank 0) and the probe schedule `probe_due`
policies     interval rules and weight policies, one registry per family
trajectory   the row type of trajectory.csv
"""
