"""``nasq compare RUN_A RUN_B``: two runs side by side, judged on the images both saw.

Accuracy is compared pairwise (the same images): the top-1 difference with a 95 % confidence
interval for paired proportions, and McNemar's exact test on the images one run got right and
the other wrong. Also: how many images changed their top-1 class, per-device throughput side by
side, and every configuration field that differs.
"""
from __future__ import annotations

from ..rundata import Report
from ..tables import num, table
from ..wire import DatasetRef
from .report import device_cell, versions_text
from .stats import mcnemar_exact, paired_difference


def dataset_identities(a: DatasetRef | None, b: DatasetRef | None) -> tuple[str | None, str | None]:
    """What tells two runs' datasets apart: their ``content`` (the bytes) when both recorded
    it, else their listings' fingerprints (a run of an earlier nasq recorded only that)."""
    if a and b and a.content and b.content:
        return a.fingerprint, b.fingerprint
    return tuple(d and (d.listing or d.fingerprint) for d in (a, b))


def compare(a: Report, pa: dict, b: Report, pb: dict) -> dict:
    """Compare report ``a`` (predictions ``pa``) with ``b`` (``pb``).

    Returns:
        A JSON-ready dict: images both saw with a label, top-1 of each there, the difference
        (b - a) in points with Newcombe's 95 % interval for paired proportions, McNemar's counts
        and exact p-value, images whose top-1 class changed, per-device throughput, the
        configuration differences and ``warnings`` (no shared images, other datasets or labels):
        with warnings, the two runs are not comparable as they stand.
    """
    ia = {n: (lab, ids) for n, lab, ids in zip(pa["names"], pa["labels"], pa["top5"])}
    ib = {n: (lab, ids) for n, lab, ids in zip(pb["names"], pb["labels"], pb["top5"])}
    both = sorted(set(ia) & set(ib))
    changed = sum(1 for n in both if ia[n][1][:1] != ib[n][1][:1])
    lab = [n for n in both if ia[n][0] is not None and ia[n][0] == ib[n][0]]
    ra = [ia[n][1][:1] == [ia[n][0]] for n in lab]
    rb = [ib[n][1][:1] == [ib[n][0]] for n in lab]
    only_a = sum(1 for x, y in zip(ra, rb) if x and not y)
    only_b = sum(1 for x, y in zip(ra, rb) if y and not x)
    both_right = sum(1 for x, y in zip(ra, rb) if x and y)
    n = len(lab)
    acc = {}
    if n:
        d, low, high = paired_difference(both_right, only_a, only_b, n - both_right - only_a - only_b)
        acc = {"top1_a": 100 * sum(ra) / n, "top1_b": 100 * sum(rb) / n, "delta_points": 100 * d,
               "ci95_points": [100 * low, 100 * high], "ci_method": "Newcombe square-and-add (paired)",
               "mcnemar": {"a_right_b_wrong": only_a, "b_right_a_wrong": only_b,
                           "p_value": mcnemar_exact(only_a, only_b)}}
    config = {"backend": [a.backend.name, b.backend.name], "precision": [a.precision, b.precision],
              "batch_size": [a.batch_size, b.batch_size], "num_outputs": [a.num_outputs, b.num_outputs],
              "model": [r.model.get("sha256", r.model.get("artifact_key")) for r in (a, b)],
              "dataset": list(dataset_identities(a.dataset, b.dataset)), "labels": [a.labels_sha256, b.labels_sha256],
              "versions": [versions_text(a.backend.versions), versions_text(b.backend.versions)],
              "devices": [", ".join(sorted({device_cell(d) for d in r.per_device})) for r in (a, b)]}
    warnings = []
    if not both:
        warnings.append("the runs share no image (by name): there is nothing to compare")
    elif not any(ia[x][0] is not None or ib[x][0] is not None for x in both):
        warnings.append("neither run has labels: accuracy cannot be compared (top-1 changes and throughput are shown)")
    elif not n:
        warnings.append("no image both runs saw has the same label in both: accuracy cannot be compared")
    if config["dataset"][0] != config["dataset"][1]:
        warnings.append(f"different datasets (fingerprints {config['dataset'][0]} and {config['dataset'][1]}): "
                        "images of the same name may not be the same images")
    elif bool(a.dataset and a.dataset.content) != bool(b.dataset and b.dataset.content):
        warnings.append("the same listing (names and sizes), but a run of an earlier nasq did not record its images' "
                        "bytes: whether they were the same bytes is not known")
    if None not in config["labels"] and config["labels"][0] != config["labels"][1]:
        warnings.append("different label files: the accuracies are against different answers")
    relabelled = sum(1 for x in both if ia[x][0] is not None and ib[x][0] is not None and ia[x][0] != ib[x][0])
    if relabelled:
        warnings.append(f"{relabelled} image(s) both runs saw have different labels in the two runs: left out of "
                        "the paired comparison")
    for name, r in (("A", a), ("B", b)):
        if not r.complete:
            warnings.append(f"run {name} is {r.shown_state}: it covers {r.images} of {r.planned_images} images")
    simulated = [name for name, r in (("A", a), ("B", b)) if r.backend.name == "sim"]
    if len(simulated) == 1:
        warnings.append(f"run {simulated[0]} ran on SIMULATED devices and the other on real ones: its throughput is "
                        "a simulator's, not a measurement, and its predictions are not a model's")
    return {"run_a": a.run_id, "run_b": b.run_id, "images_both": len(both), "images_labelled_both": n,
            "top1_changed": changed, **acc,
            "throughput": {"a": a.throughput_img_s, "b": b.throughput_img_s},
            "per_device": {k: [[device_cell(d), d["worker"], d.get("img_s_compute"), d.get("img_s_wall")]
                               for d in r.per_device] for k, r in (("a", a), ("b", b))},
            "differences": {k: v for k, v in config.items() if v[0] != v[1]},
            "warnings": warnings,
            "comparable": bool(n) and not relabelled and config["dataset"][0] == config["dataset"][1]
            and (None in config["labels"] or config["labels"][0] == config["labels"][1])}


def render(c: dict) -> str:
    lines = [f"compare {c['run_a']} (A) with {c['run_b']} (B): {c['images_both']} images in both, "
             f"{c['images_labelled_both']} with the same label; top-1 class changed on {c['top1_changed']}"]
    lines += [f"  WARNING: {w}" for w in c.get("warnings") or []]
    if "delta_points" in c:
        m = c["mcnemar"]
        lines += [f"  top-1  A {c['top1_a']:.2f} %  B {c['top1_b']:.2f} %  B - A {c['delta_points']:+.2f} points "
                  f"(95 % CI {c['ci95_points'][0]:+.2f} to {c['ci95_points'][1]:+.2f}, Newcombe, paired)",
                  f"  McNemar: A right and B wrong on {m['a_right_b_wrong']}, B right and A wrong on "
                  f"{m['b_right_a_wrong']}; exact p = {m['p_value']:.4g}"
                  + ("  (no evidence of a difference)" if m["p_value"] >= 0.05 else "  (a real difference at 5 %)")]
    lines.append(f"  throughput (shards' span): A {num(c['throughput']['a'])} img/s, "
                 f"B {num(c['throughput']['b'])} img/s")
    rows = [["A", *r] for r in c["per_device"]["a"]] + [["B", *r] for r in c["per_device"]["b"]]
    lines += ["", table(rows, ["run", "device", "worker", "compute img/s", "wall img/s"], indent="  ")]
    if c["differences"]:
        lines += ["", table([[k, str(v[0]), str(v[1])] for k, v in c["differences"].items()],
                            ["differs", "A", "B"], indent="  ")]
    else:
        lines.append("  configuration: identical")
    return "\n".join(lines)
