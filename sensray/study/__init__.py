"""Studies: stages that each read earlier ones, in one resumable directory (`sensray study`, cli.py).

    spec.py        the study spec: model, eval text, stages; references checked at parse time
    stages.py      the Stage base class and the registry of kinds; StageContext; Record
    sweeps.py      kinds over sweeps: sweep, analyze, allocate (allocation.py: its table and figure)
    exports.py     kinds that write a model: prune, heal
    evaluation.py  evaluate: every model against the dense one, as a run directory
    report.py      report: the comparison, with figures (reading.py: its sentences)
    journal.py     input hashes and the journal of finished stages
    runner.py      in order, skipping what is done and current; --stage runs one
"""
