"""The speed-ups, one module per stage, each with the same small contract (stages/base.py).

config.py    the optimization config: every knob, declared once (cheap to import)
registry.py  the ordered stages and `resolve` (what a config will run on this machine)
rules.py     every rule between two stages, in dependency order
"""
