"""What cls.py and the scripts beside it share, one job a module:

    cli         flag types, one-line errors, how every script ends
    runtime     processes, devices, autocast, signals and RNG states
    data        the datasets: CIFAR read into device-resident loaders, synthetic images, ImageNet folders
    progress    where an epoch stands (saved in checkpoints), and how it shows it: a bar, or lines in a log
    layerstats  per-layer statistics on a fixed probe batch, each epoch
    board       a run's TensorBoard events: its training curves, test metrics, layer statistics and gains
    layers      the layers of the norms beside torch's own: WN, WS, scaled WS, mean-only BN
    files       results files written whole or not at all, and read back with one line for a bad one
    record      a run's record: its folder, every file it writes and reads back, its status
    results     the runs of a results folder as the report reads them, and summary.csv derived from them
    migrate     report.py --migrate: the flat results folder of earlier versions moved into recipe folders
    metrics     top-k counts and number formatting
    plots       every figure report.py draws
    agc         adaptive gradient clipping
    slurm       sweep.py's SLURM launcher, through submitit

record, results and migrate know runs by their recipe, so they import recipe.py (and through it model.py's
registries); the others import neither (slurm runs cls.py in its jobs): what they need of a network comes in as
arguments.
"""
