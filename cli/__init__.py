"""The command line: the parser (options.py, generated from the config's declarations), the
commands (commands.py) and the doctor's report (doctor.py)."""
