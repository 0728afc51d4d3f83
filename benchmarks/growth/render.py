"""The growth benchmark's tables and plot (benchmarks/results/growth.{md,png}), from its records alone."""

from __future__ import annotations

import statistics

from gpp_ext.io import write_atomic, write_text_atomic

from .runner import RESNET_DEPTHS


def _kept(records: list) -> list:
    """The kept grown nets of every seed, by seed then index."""
    return sorted((r for r in records if len(r["key"]) == 3 and r["key"][1] == "grown" and r.get("kept")),
                  key=lambda r: (r["key"][0], r["key"][2]))


def _at(records: list, seed: int, kind: str, net: int):
    return next((r for r in records if r["key"] == [seed, kind, net]), None)


def _acc(r) -> str:
    return f"{r['test_accuracy']:.4f} ({r['params']:,})" if r else "–"


def table(records: list) -> str:
    """Per seed and kept grown net: the net's test accuracy and every other way to reach its size (test accuracy,
    parameters in brackets). The ResNets had the grown net's epochs; the pushed-and-pruned net, the net's
    architecture from scratch and grow-and-prune had the epochs in the "epochs after" column (the largest net's
    plus the prune's). Growth takes a different path per seed, so nets are not averaged across seeds; the answers
    are paired differences (`answers`)."""
    lines = ["| seed | net | modules | epochs | grown | epochs after | largest pushed+pruned | the net from scratch | "
             "grow-and-prune | ResNet-8 | ResNet-14 | ResNet-20 |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in _kept(records):
        seed, net = r["key"][0], r["key"][2]
        later = next((x["epochs"] for x in (_at(records, seed, k, net) for k in ("pruned", "scratch", "gap")) if x),
                     None)
        lines.append(f"| {seed} | {net} | {r['modules']} | {r['epochs']:g} | {_acc(r)} | "
                     f"{'–' if later is None else f'{later:g}'} | "
                     + " | ".join(_acc(_at(records, seed, kind, net))
                                  for kind in ("pruned", "scratch", "gap", *RESNET_DEPTHS)) + " |")
    return "\n".join(lines) + "\n"


def _pairs(records: list, ours: str, theirs) -> list:
    """`(seed, net, ours - theirs)` test-accuracy differences at every kept net's size where both are recorded
    (`ours`/`theirs`: a kind, or "grown"; `theirs` may be a function of `(seed, net)` giving the record)."""
    out = []
    for r in _kept(records):
        seed, net = r["key"][0], r["key"][2]
        a = r if ours == "grown" else _at(records, seed, ours, net)
        b = theirs(seed, net) if callable(theirs) else (r if theirs == "grown" else _at(records, seed, theirs, net))
        missed = a is not None and b is not None and False in (a.get("target_reached"), b.get("target_reached"))
        if a is not None and b is not None and not missed:  # a net that missed its size is no pair at equal size
            out.append((seed, net, a["test_accuracy"] - b["test_accuracy"]))
    return out


def answers(records: list) -> str:
    """The benchmark's questions, answered by paired differences at equal size (same seed, same net's size)."""
    def best_resnet(seed, net):  # the depth with the best validation accuracy (test accuracy chooses nothing)
        rs = [x for x in (_at(records, seed, k, net) for k in RESNET_DEPTHS) if x is not None]
        return max(rs, key=lambda x: x["val_accuracy"]) if len(rs) == len(RESNET_DEPTHS) else None

    questions = [("grown Inception net vs the ResNet-8/14/20 of its size with the best validation accuracy", "grown",
                  best_resnet)]
    questions += [(f"grown Inception net vs {k.replace('resnet', 'ResNet-')}", "grown", k) for k in RESNET_DEPTHS]
    questions += [("largest grown net pushed+pruned vs the grown net of that size (the first had more epochs)",
                   "pruned", "grown"),
                  ("largest grown net pushed+pruned vs that net's architecture from scratch, equal epochs", "pruned",
                   "scratch"),
                  ("grow-and-prune from scratch vs train-then-prune (pushed+pruned), equal epochs", "gap", "pruned")]
    lines = ["| question (first minus second) | pairs | seeds | first wins | mean difference (points) | "
             "mean of the seeds' means | min | max |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    rows = [(text, _pairs(records, ours, theirs)) for text, ours, theirs in questions]
    rows.append(("growth in triage order vs first to last, where both end at the same size", _order_pairs(records)))
    for text, pairs in rows:
        diffs = [d for _, _, d in pairs]
        if not diffs:
            lines.append(f"| {text} | 0 | 0 | – | – | – | – | – |")
            continue
        by_seed = {}
        for seed, _, d in pairs:
            by_seed.setdefault(seed, []).append(d)
        seed_means = statistics.mean(statistics.mean(v) for v in by_seed.values())
        lines.append(f"| {text} | {len(diffs)} | {len(by_seed)} | {sum(d > 0 for d in diffs)} | "
                     f"{100 * statistics.mean(diffs):+.2f} | {100 * seed_means:+.2f} | {100 * min(diffs):+.2f} | "
                     f"{100 * max(diffs):+.2f} |")
    return "\n".join(lines) + "\n"


def _order_pairs(records: list) -> list:
    """`(seed, None, triage order - first to last)` test-accuracy differences of the two growths' largest nets,
    for the seeds where both ended with the same parameter count (otherwise the difference is not at equal
    size)."""
    out = []
    for r in records:
        if r["key"][1] != "grown-triage":
            continue
        first = next((x for x in records if x["key"] == [r["key"][0], "grown-largest"]), None)
        if first is not None and first["params"] == r["params"]:
            out.append((r["key"][0], None, r["test_accuracy"] - first["test_accuracy"]))
    return out


def order_table(records: list) -> str:
    """Per seed: the growth in first-to-last order against the growth in triage order (what each ended with)."""
    lines = ["| seed | first to last: params | test | triage order | params | test | triage seconds | "
             "triage and growth seconds |", "|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in sorted((r for r in records if r["key"][1] == "grown-triage"), key=lambda r: r["key"][0]):
        first = next((x for x in records if x["key"] == [r["key"][0], "grown-largest"]), None)
        if first is None:
            continue
        lines.append(f"| {r['key'][0]} | {first['params']:,} | {first['test_accuracy']:.4f} | "
                     f"{' '.join(map(str, r['order']))} | {r['params']:,} | {r['test_accuracy']:.4f} | "
                     f"{_seconds(r.get('triage_seconds'))} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def _seconds(value) -> str:
    return "–" if value is None else f"{value:.0f}"


def plot(records: list, path: str) -> None:
    """Test accuracy against parameters, one panel per seed: the grown nets (the path growth took), the largest
    pushed and pruned to their sizes, grow-and-prune, and the ResNets matched to them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted({r["key"][0] for r in _kept(records)})
    if not seeds:
        return
    fig, axes = plt.subplots(1, len(seeds), figsize=(6 * len(seeds), 4.5), squeeze=False, sharey=True)
    styles = {"grown": ("o-", "grown Inception"), "pruned": ("s--", "largest pushed+pruned"),
              "scratch": ("v:", "the net from scratch, as many epochs as pushed+pruned"),
              "gap": ("^:", "grow-and-prune"), "resnet8": ("x:", "ResNet-8"), "resnet14": ("+:", "ResNet-14"),
              "resnet20": ("d:", "ResNet-20")}
    for ax, seed in zip(axes[0], seeds):
        kept = [r for r in _kept(records) if r["key"][0] == seed]
        for kind, (style, label) in styles.items():
            rs = kept if kind == "grown" else [x for x in (_at(records, seed, kind, r["key"][2]) for r in kept) if x]
            if rs:
                rs = sorted(rs, key=lambda x: x["params"])
                ax.plot([x["params"] for x in rs], [x["test_accuracy"] for x in rs], style, label=label,
                        linewidth=2 if kind == "grown" else 1)
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.set_title(f"seed {seed}")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("test accuracy")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def render(records: list, stem: str) -> None:
    """`stem`.md (the tables) and `stem`.png (the plot) from the records, atomically."""
    commits = sorted({r["commit"] for r in records if r.get("commit")})
    machines = sorted({r["machine"] for r in records if r.get("machine")})
    seeds = sorted({r["key"][0] for r in records})
    write_text_atomic(stem + ".md", "# Growth benchmark\n\n"
                      f"Machine: {', '.join(machines) or '–'}; commits {', '.join(commits) or '–'}; seeds "
                      f"{', '.join(map(str, seeds)) or '–'}. Every net trained with the loop's recipe; test accuracy "
                      "(parameters in brackets). `benchmarks/growth/` states the protocol.\n\n"
                      "## The answers: paired differences at equal size\n\n" + answers(records)
                      + "\n## Every kept grown net and the other ways to reach its size\n\n" + table(records)
                      + "\n## Growth order: first to last, or most critical first (triage)\n\n"
                      + order_table(records))
    plot(records, stem + ".png")
