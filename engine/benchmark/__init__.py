"""The stage-by-stage benchmark that `flux_kontext_optimized.py benchmark` and `GET /benchmark` run:
cumulative presets through the engine's own edit path (runner.py), the floor under a step
(roofline.py), and the tables, files and charts it writes (report.py). Lab scripts that dig deeper
live in benchmarks/ and import from here, never the other way round."""
