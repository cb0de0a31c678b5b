"""What cls.py and the scripts beside it share, one job a module:

    cli         flag types, one-line errors, how every script ends
    runtime     processes, devices, autocast, signals and RNG states
    data        the datasets: CIFAR read into device-resident loaders, synthetic images, ImageNet folders
    progress    where an epoch stands (saved in checkpoints), and how it shows it: a bar, or lines in a log
    layerstats  per-layer statistics on a fixed probe batch, each epoch
    board       a run's TensorBoard events: its training curves, test metrics, layer statistics and gains
    runfiles    every file of a run: CSV columns, atomic writes, summary.csv under a lock, the run's record
    metrics     top-k counts and number formatting
    plots       every figure report.py draws

None of them imports model.py: what they need of a network comes in as arguments.
"""
