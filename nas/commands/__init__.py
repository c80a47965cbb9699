"""The command lines: each `nas COMMAND` (and `python -m nas.COMMAND`) parses its options and
calls one workflow; what they share (`cli`: parsers, exit codes, device and process options).
`--help` loads no torch. May import every package.
"""
