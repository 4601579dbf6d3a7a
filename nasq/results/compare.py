"""``nasq compare RUN_A RUN_B``: two runs side by side, judged on the images both saw.

Accuracy is compared pairwise (the same images): the top-1 difference with a 95 % confidence
interval for paired proportions, and McNemar's exact test on the images one run got right and
the other wrong. Also: how many images changed their top-1 class, per-device throughput side by
side, and every configuration field that differs.
"""
from __future__ import annotations

import math

from ..tables import table
from .report import device_cell, versions_text


def _binom_two_sided(k: int, n: int) -> float:
    """Exact two-sided p-value of k successes in n fair coin flips (McNemar's exact test)."""
    if n == 0:
        return 1.0
    k = min(k, n - k)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def compare(a: dict, pa: dict, b: dict, pb: dict) -> dict:
    """Compare report ``a`` (predictions ``pa``) with ``b`` (``pb``).

    Returns:
        A JSON-ready dict: images both saw with a label, top-1 of each there, the difference
        (b - a) in points with its 95 % interval, McNemar's counts and p-value, images whose
        top-1 class changed, per-device throughput and the configuration differences.
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
    n = len(lab)
    acc = {}
    if n:
        pa1, pb1 = sum(ra) / n, sum(rb) / n
        diff = (only_b - only_a) / n
        # paired proportions: var(d) = (p01 + p10 - d^2) / n
        se = math.sqrt(max(0.0, (only_a + only_b) / n - diff ** 2) / n)
        acc = {"top1_a": round(100 * pa1, 4), "top1_b": round(100 * pb1, 4), "delta_points": round(100 * diff, 4),
               "ci95_points": [round(100 * (diff - 1.96 * se), 4), round(100 * (diff + 1.96 * se), 4)],
               "mcnemar": {"a_right_b_wrong": only_a, "b_right_a_wrong": only_b,
                           "p_value": float(f"{_binom_two_sided(only_b, only_a + only_b):.6g}")}}
    keys = ("backend", "precision", "batch_size", "num_outputs")
    config = {k: [a.get(k) if k != "backend" else a["backend"]["name"], b.get(k) if k != "backend" else b["backend"]["name"]]
              for k in keys}
    config["model"] = [(a.get("model") or {}).get("sha256", (a.get("model") or {}).get("artifact_key")),
                       (b.get("model") or {}).get("sha256", (b.get("model") or {}).get("artifact_key"))]
    config["dataset"] = [a["dataset"].get("fingerprint"), b["dataset"].get("fingerprint")]
    config["versions"] = [versions_text(a["backend"].get("versions")), versions_text(b["backend"].get("versions"))]
    config["devices"] = [", ".join(sorted({device_cell(d) for d in a["per_device"]})),
                         ", ".join(sorted({device_cell(d) for d in b["per_device"]}))]
    return {"run_a": a["run_id"], "run_b": b["run_id"], "images_both": len(both), "images_labelled_both": n,
            "top1_changed": changed, **acc,
            "throughput": {"a": a.get("throughput_img_s"), "b": b.get("throughput_img_s")},
            "per_device": {"a": [[d["worker"], device_cell(d), d.get("img_s_compute"), d.get("img_s_wall")]
                                 for d in a["per_device"]],
                           "b": [[d["worker"], device_cell(d), d.get("img_s_compute"), d.get("img_s_wall")]
                                 for d in b["per_device"]]},
            "differences": {k: v for k, v in config.items() if v[0] != v[1]}}


def render(c: dict) -> str:
    lines = [f"compare {c['run_a']} (A) with {c['run_b']} (B): {c['images_both']} images in both, "
             f"{c['images_labelled_both']} with the same label; top-1 class changed on {c['top1_changed']}"]
    if "delta_points" in c:
        m = c["mcnemar"]
        lines += [f"  top-1  A {c['top1_a']:.2f} %  B {c['top1_b']:.2f} %  B - A {c['delta_points']:+.2f} points "
                  f"(95 % CI {c['ci95_points'][0]:+.2f} to {c['ci95_points'][1]:+.2f})",
                  f"  McNemar: A right and B wrong on {m['a_right_b_wrong']}, B right and A wrong on "
                  f"{m['b_right_a_wrong']}; exact p = {m['p_value']:.4g}"
                  + ("  (no evidence of a difference)" if m["p_value"] >= 0.05 else "  (a real difference at 5 %)")]
    lines.append(f"  throughput (shards' span): A {c['throughput']['a']} img/s, B {c['throughput']['b']} img/s")
    rows = [["A", *r] for r in c["per_device"]["a"]] + [["B", *r] for r in c["per_device"]["b"]]
    lines += ["", table(rows, ["run", "worker", "device", "compute img/s", "wall img/s"], indent="  ")]
    if c["differences"]:
        lines += ["", table([[k, str(v[0]), str(v[1])] for k, v in c["differences"].items()],
                            ["differs", "A", "B"], indent="  ")]
    else:
        lines.append("  configuration: identical")
    return "\n".join(lines)
