"""Healing a damaged model by fine-tuning: `sensray heal` (cli.py), and the pieces a study stage reuses.

    recipe.py        HealRecipe: what a heal does, validated; check_recipe (the dry run's checks)
    data.py          training windows, batch order by (seed, step), the train != eval guard
    masks.py         the pruning mask: read, held at zero (gradients), re-applied, counted
    lora.py          peft adapters on the layers target patterns select; merge
    engine.py        accelerate (device, mixed precision, DDP) or DeepSpeed ZeRO; the lr schedule
    checkpoint.py    the state directory: checkpoints, loss curve, what --resume reads
    loop.py          one worker: load, wrap, train, export (in-process or under Ray Train)
    export.py        merge, re-mask, evaluate, write the HF directory + sensray-heal.json
    distributed.py   Ray Train's TorchTrainer on sensray's Ray
    run.py           the driver: state directory, where to train, what went wrong
    figure.py        the loss-curve figure
"""
