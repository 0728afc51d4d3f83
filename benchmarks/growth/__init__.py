"""The growth benchmark: does a grown Inception net beat residual nets of the same size, does pushing and pruning
the largest grown net beat the smaller nets met while growing (and those nets' architectures trained as long), does
scheduled grow-and-prune beat train-then-prune at equal epochs, and does growing the most critical stages first
pay?

    python -m benchmarks.growth                        # Fashion-MNIST, seeds 0, 1, 2 (days on one core)
    python -m benchmarks.growth --resume               # go on after an interruption
    python -m benchmarks.growth --smoke                # digits, one seed, tiny epochs: proves the harness

Per seed, with the loop's training recipe (`loop.train_kwargs(recipes.build("gpp"))`) on the same splits as the
compression benchmark:

1. `grown`: the Inception net (`models.build("inception")`) trained `base_epochs`, then grown stage by stage by
   `growth.inception` (each candidate trained `grow_epochs`, kept if validation accuracy rose at all); every net
   met on the way is recorded (params, FLOPs, validation and test accuracy, the epochs that built it, kept or not;
   the largest's record also counts the epochs spent on refused attempts, `refused_epochs`). Its candidates are
   measured with BatchNorm's running averages as training left them, where `gpp compress --grow` now
   re-estimates them after each candidate's training: that matters for a few dozen steps on a small data set
   (digits); here a candidate trains 860 steps, and the records predate the loop's re-estimate.
2. `pruned`: the largest grown net pushed and pruned by the default loop (`GrowPushPrune(...).run()`, epoch
   budget `prune_epochs`) to the size of each smaller kept net; each record states the default recipe it ran
   and the pruning algorithms' version (`recipe`); one made by another is redone on `--resume`. It has seen
   more epochs than the grown net of its size (the largest's plus `prune_epochs`), so:
2b. `scratch`: each smaller kept net's architecture trained from scratch for those same epochs: the second
   claim at equal epochs.
3. `resnet`: ResNet-8, -14 and -20 (CIFAR layout, stage widths w, 2w, and the last width bisected) chosen so the
   parameters match each kept grown net, trained from scratch for as many epochs as that net has seen.
4. `gap` against `pruned`: scheduled grow-and-prune (`gap.scheduled_grow_and_prune`) of the largest net's
   architecture from scratch, to each smaller size, with the epochs the largest net saw plus `prune_epochs`
   (what `pruned` had in all: train-then-prune at equal epochs).
5. `grown-triage`: the same trained net grown again with its most critical stages first (`triage` of its
   modules, each replaced by one layer and fine-tuned `grow_epochs` with distillation, then `stage_order`: what
   `LoopConfig(grow_order="triage")` runs), against the first-to-last order of 1.

The runs go in three passes over the seeds: 1–3 (what answers the paper's two claims) for every seed, then 2b
(the control), then 4 and 5, which take about as long again as the rest (a grow-and-prune trains the largest
architecture from scratch for as many epochs as the growth and the prune had together). The answers pair runs
of the same seed at the same net's size; "the best ResNet" is the depth with the best validation accuracy; the
triage order is compared with first to last only where both growths end at the same size.

The long steps checkpoint in the folder beside the records (`benchmarks/results/growth-nets/` for `growth.json`,
committed with them): each growth after every attempt (`grow(after_step=...)`), the triage, and every long
training (the base, each grow-and-prune, each ResNet, each net from scratch) after every epoch
(`fit(checkpoint=...)`, with its wall and CPU time so far), and each push and prune of the largest net after
every stage of its loop (its run folder `pruned-<net>-seed<seed>/` and a mark of what it was started for and the
time it has taken), so an interrupted seed resumes inside its step instead of starting it over, in another
session or checkout too, and records the times an uninterrupted run would (a pushed and pruned net's time counts
its interrupted attempts only when they were stopped by Ctrl-C or `kill`, not by a hard kill). A
recorded seed whose largest grown net's file is gone is grown again (seeded) to rebuild it: its records stand when
the growth meets the recorded nets again, and are redone from the new growth when it does not. Results go to
benchmarks/results/growth.{json,md,png} atomically after every run (`--render` redraws the tables and plot from
the records alone); `--resume` keeps the runs recorded with the same settings and runs the rest.
Growth takes its own path per seed, so the tables pair every comparison with a grown net of the same seed and
answer each question by the paired differences (with their mean over pairs and the mean of each seed's mean).
`--resume` refuses a results file holding runs made with other settings rather than dropping them.

Its parts: `runner.py` runs a seed's steps and keeps the records and checkpoints, `render.py` draws the tables and
plot from the records, `__main__.py` is the command line.
"""
