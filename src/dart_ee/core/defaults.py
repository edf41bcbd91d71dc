"""Defaults that the config, the command line and the library share, written once.

A certified budget holds "with probability at least CONFIDENCE" over the draw of the calibration
split; FIT_SHARE of that split fits a policy's candidates and the rest certifies them (a policy whose
candidates need no data certifies on all of it). Torch-free, so the CLI and the config read it at start.
"""

CONFIDENCE = 0.95
FIT_SHARE = 0.4
