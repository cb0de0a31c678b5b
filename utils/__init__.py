"""What cls.py and the scripts beside it share, one job a module:

    cli         flag types, one-line errors, how every script ends
    runtime     processes, devices, autocast, signals and RNG states
    data        the datasets: CIFAR read into device-resident loaders, synthetic images, ImageNet folders
    progress    where an epoch stands (saved in checkpoints), and how it shows it: a bar, or lines in a log
    layerstats  per-layer statistics on a fixed probe batch, each epoch
    board       a run's TensorBoard events: its training curves, test metrics, layer statistics and gains
    runfiles    the run's record: its name, every file it writes and reads back, its status, summary.csv
    metrics     top-k counts and number formatting
    plots       every figure report.py draws
    agc         adaptive gradient clipping
    slurm       sweep.py's SLURM launcher, through submitit

None of them imports model.py (slurm runs cls.py in its jobs): what they need of a network comes in as arguments.
"""
