"""The worst-case bit-flip attack: a progressive bit search guided by gradients, spread over the replicas.

    sensray attack experiments/attack-bitflip.yaml

spec.py     the attack spec (strict YAML, like an experiment spec)        checks.py  what --dry-run checks
rank.py     one backward pass -> candidate flips ranked by predicted damage (on a replica)
replica.py  AttackReplica: a Replica that ranks candidates and measures a utility text; its factory
loop.py     the driver: random baseline, then rank -> exact trials on the pool -> commit the best
state.py    the run directory and its journals (flips.jsonl is the committed state; --resume)
report.py   tables, damage-vs-flips figure beside the random baseline, report.md
cli.py      sensray attack
"""
