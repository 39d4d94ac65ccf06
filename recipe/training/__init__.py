"""The trainer's parts, one concern per module; ``recipe/train.py`` runs the loop over them.

    plan.py          every check that needs no process group: configs, data, run folder, resume / reshard
    distributed.py   process group, per-rank seed, the small cross-rank sums and votes, shm-segment release
    build.py         model, resharded or initial weights, param groups, deepspeed.initialize, data loaders
    step.py          one optimizer step with the non-finite guard
    evaluate.py      validation loss (and the expert-load heatmap)
    checkpointing.py start fresh, resume, reshard, save
    telemetry.py     console and progress, named loss and routing tallies, log records, summary
    exit_codes.py    what the trainer's exit status means
"""
