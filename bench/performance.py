"""Run the performance benchmarks and write docs/results/performance.{json,md}.

    nice -n 19 env PYTHONPATH=. python -m bench.performance --shared --note "..."   # full size
    nice -n 19 env PYTHONPATH=. python -m bench.performance --quick                  # smoke version
    python -m bench.performance --only weight_sync                                   # one benchmark;
                                                  # the others' figures are read from their last JSON
    python -m bench.performance --summarize          # rewrite the summary from the last JSON, run nothing

Benchmarks (one module each, each also runnable alone with ``--quick``):

* ``bench.ray_overhead``: epoch time through the actors vs a plain single-process loop doing
  the same work (and the overlap of reward with sampling), 1 and 2 rollout actors;
* ``bench.weight_sync``: seconds and bytes per ``sync_weights`` vs parameter count, LoRA vs full;
* ``bench.controller_scaling``: the driver's overhead per epoch with 1..64 stand-in actors;
* ``bench.gpu_throughput``: SDXL-size UNet bf16 throughput (needs CUDA; skipped without).

Full-size figures go to ``docs/results/performance/<benchmark>.json`` (plots next to them) and
the summary to ``docs/results/performance.{json,md}``; ``--quick`` writes everything under
``runs/bench-quick/`` instead, so it never overwrites the measured figures.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from bench.common import FULL_OUT, QUICK_OUT, RESULTS, ROOT, fmt, log, machine_info, ratio, read_json, write_json

BENCHMARKS = ("best_loop", "ray_overhead", "weight_sync", "controller_scaling", "gpu_throughput")


def family_words(family: str | None) -> str:
    """'MiniCarve v2's sd-grid family, ' and the like, for the setup sentence (empty when unknown)."""
    world = {"pixel-grid": "MiniCarve v1's ", "sd-grid": "MiniCarve v2's "}.get(family or "", "")
    return f"{world}{family} family, " if family else ""


def sync_key(row: dict) -> str:
    """model/finetune, plus /broadcast for a broadcast row (the object store rows keep their old keys)."""
    mode = row.get("weight_sync", "object_store")
    return f"{row['model']}/{row['finetune']}" + ("" if mode == "object_store" else f"/{mode}")
GPU_COMMAND = "python -m bench.gpu_throughput --batch 4 --steps 20"


def run_benchmark(name: str, quick: bool, out_dir: Path) -> dict:
    import importlib

    module = importlib.import_module(f"bench.{name}")
    if name == "gpu_throughput":
        return module.main(out_dir=out_dir)  # skipped without CUDA; never a CPU run here
    return module.main(quick=quick, out_dir=out_dir)


def combine(details: dict, machine: dict) -> dict:
    """The flat figures of performance.json from each benchmark's JSON (pure)."""
    out: dict = {}
    ro = details.get("ray_overhead")
    if ro:
        actors = ro.get("actors", {})
        out.update({
            "ray_overhead_ratio": ro.get("ray_overhead_ratio"),
            "ray_overhead_ratio_target": 1.10,
            "ray_overhead_cpu_ratio": ro.get("ray_overhead_cpu_ratio"),
            "overlap_ratio": ro.get("overlap_ratio"),
            "reward_hidden_share": ro.get("reward_hidden_share"),
            "actors_epoch_seconds": actors.get("1", {}).get("epoch_seconds"),
            "plain_epoch_seconds": ro["plain"]["epoch_seconds"],
            "plain_sample_seconds": ro["plain"]["sample_seconds"],
            "plain_reward_seconds": ro["plain"]["reward_seconds"],
            "plain_train_seconds": ro["plain"]["train_seconds"],
            "plain_load_weights_seconds": ro["plain"]["sync_seconds"],
            "plain_sum_of_phases_seconds": ro["plain"]["sum_of_phases_seconds"],
            "plain_cpu_seconds": ro["plain"].get("cpu_seconds"),
            "actors_cpu_seconds": actors.get("1", {}).get("cpu_seconds"),
        })
        if "2" in actors:
            out["actors_epoch_seconds_2_rollout_workers"] = actors["2"]["epoch_seconds"]
            out["ray_overhead_ratio_2_rollout_workers"] = actors["2"]["ratio_to_plain"]
            out["two_rollout_workers_speedup"] = ro.get("two_rollout_workers_speedup")
    best = details.get("best_loop")
    if best:  # the headline ratio is against the best plain loop; the one-thread one stays for the overlap analysis
        if "ray_overhead_ratio" in out:
            out["ray_overhead_ratio_one_thread"] = out["ray_overhead_ratio"]
        out.update({
            "ray_overhead_ratio": best["ray_overhead_ratio"], "ray_overhead_ratio_target": 1.0,
            "best_plain": {k: best["best_plain"][k] for k in ("threads", "epoch_seconds", "samples_per_second")},
            "best_actors": {k: best["best_actors"][k] for k in ("setting", "epoch_seconds", "samples_per_second")},
            "unet_peak_share": {f"plain_{s['threads']}_threads": {
                "sampling": s["sampling_unet_peak_share"], "training": s["training_unet_peak_share"]}
                for s in best["plain"]},
        })
    ws = details.get("weight_sync")
    if ws:
        out["weight_sync"] = {sync_key(r): {
            "unet_parameters": r["unet_parameters"], "trainable_parameters": r["trainable_parameters"],
            "bytes": r["bytes"], "seconds_median": r["seconds_median"], "mb_per_second": r["mb_per_second"]}
            for r in ws["rows"]}
        out["weight_sync_largest_full"] = ws.get("largest_full_sync")
        if ws.get("broadcast_over_object_store"):
            out["weight_sync_broadcast_over_object_store"] = ws["broadcast_over_object_store"]
    cs = details.get("controller_scaling")
    if cs:
        from bench.controller_scaling import flatness

        cs["flatness"] = flatness(cs["rows"])  # recomputed: JSON of an older version may lack a figure
        out["controller_overhead_seconds_per_epoch"] = {str(r["rollout_actors"]): r["overhead_seconds"]
                                                        for r in cs["rows"]}
        out["controller_overhead_ms_per_actor"] = {str(r["rollout_actors"]): 1e3 * r["overhead_per_actor_seconds"]
                                                   for r in cs["rows"]}
        out["controller_driver_cpu_ms_per_batch"] = {str(r["rollout_actors"]): r["driver_cpu_per_batch_ms"]
                                                     for r in cs["rows"]}
        out["controller_wall_over_ideal"] = {str(r["rollout_actors"]): r["wall_over_ideal"] for r in cs["rows"]}
        out["controller_overhead_growth_exponent"] = cs.get("flatness", {}).get("overhead_growth_exponent")
        out["controller_overhead_per_actor_growth_exponent"] = cs.get("flatness", {}).get(
            "overhead_per_actor_growth_exponent")
        if cs.get("skipped"):
            out["controller_skipped"] = cs["skipped"]
    gpu = details.get("gpu_throughput")
    if gpu:
        out["gpu_throughput"] = gpu.get("skipped") or {k: gpu.get(k) for k in (
            "gpu", "guided_steps_per_second", "images_per_second_at_50_steps", "forward_backward_seconds")}
    out["machine"] = machine
    out["details"] = details
    return out


def growth_words(exponent) -> str:
    if exponent is None or not math.isfinite(exponent):
        return "cannot say (too few points)"
    if exponent < 0.3:
        return "roughly flat"
    if exponent < 0.8:
        return "grows sublinearly with the actor count"
    return "grows about linearly with the actor count (not flat)"


def phase_gap_words(best: dict) -> str:
    """Where the best actors' epoch and the best plain loop's differ, phase by phase; and whether
    the difference stands out of the epoch-to-epoch spread."""
    a, p = best["best_actors"], best["best_plain"]
    setting = a["setting"]
    gaps = {name: a[f"{key}_seconds"] - p[f"{key}_seconds"]
            for name, key in (("sampling", "sample"), ("the reward not hidden behind sampling", "reward_tail"),
                              ("training", "train"))}
    epoch_gap = a["epoch_seconds"] - p["epoch_seconds"]
    gaps["the rest (weight sync, the driver between phases)"] = epoch_gap - sum(gaps.values())
    parts = ", ".join(f"{name} {gap:+.2f} s" for name, gap in gaps.items())
    words = (f"Where the time goes (best actors, {setting['rollout_actors']} rollout actor(s) at "
             f"{setting['rollout_threads']} thread(s), minus the plain loop at {p['threads']} thread(s), "
             f"per epoch): {parts}; epoch {epoch_gap:+.2f} s of {p['epoch_seconds']:.2f} s. The actors' "
             "training is timed inside the learner, the plain loop's includes assembling the batch, so some "
             "of the actors' call overhead sits in the rest. Sampling takes "
             f"{p['sample_seconds'] / p['epoch_seconds']:.0%} of the plain loop's epoch.")
    each = [x for side in (a, p) for x in side.get("epoch_seconds_each", [])]
    if len(each) >= 4:
        spread = max(max(side["epoch_seconds_each"]) - min(side["epoch_seconds_each"]) for side in (a, p))
        verdict = "within" if abs(epoch_gap) <= spread else "outside"
        words += f" The epoch gap is {verdict} the epoch-to-epoch spread ({spread:.2f} s)."
    else:
        words += " Each side's figure is the mean of two timed epochs, with no spread recorded: read a ratio near 1 as parity."
    return words


def when(result: dict) -> str:
    """'measured 2026-11-21 18:30, 12.5 min, load 11.8 -> 12.0' from a benchmark's JSON."""
    parts = [f"measured {result['measured_at']}"] if result.get("measured_at") else []
    if result.get("wall_seconds") is not None:
        parts.append(f"{result['wall_seconds'] / 60:.1f} min")
    if result.get("load_average_1min_start_end"):
        start, end = result["load_average_1min_start_end"]
        parts.append(f"load {fmt(start, 1)} -> {fmt(end, 1)}")
    return ", ".join(parts)


def markdown(summary: dict, command: str, wall_seconds: float) -> str:
    m, d = summary["machine"], summary["details"]
    shared = m.get("shared")
    load = m.get("load_average_1_5_15") or [float("nan")] * 3
    load_end = m.get("load_average_end") or [float("nan")] * 3
    lines = [
        "# Performance", "",
        f"Measured by `{command}` (this command: {wall_seconds / 60:.1f} min; each section says when it ran, "
        "how long it took and the 1-minute load average at its start and end). Each benchmark prints its "
        "figures while it runs and writes its own JSON under `docs/results/performance/`; this page and "
        "`docs/results/performance.json` combine them. Ratios are measured side by side in one run; no test "
        "asserts a timing.", "",
        "## Machine", "",
        f"- CPU: {m.get('cpu_model')}, {m.get('logical_cpus')} logical CPUs; {m.get('memory_gib')} GiB memory; no GPU"
        if not m.get("cuda_available") else f"- CPU: {m.get('cpu_model')}, {m.get('logical_cpus')} logical CPUs",
        f"- {m.get('platform')}, Python {m.get('python')}, torch {m.get('torch')}, Ray {m.get('ray')}",
        f"- load average (1/5/15 min) at the start {', '.join(fmt(x) for x in load)}; at the end "
        f"{', '.join(fmt(x) for x in load_end)}",
    ]
    if shared:
        lines += [f"- **Shared machine**: {m.get('note') or 'other work ran at the same time'}. The two sides of each "
                  "ratio ran one after the other, so the other work's load differed between them: **the ratios "
                  "are noisy** and are to be measured again on a quiet machine.", ""]
    elif shared is False:
        lines += ["- The machine ran nothing else during the measurement.", ""]
    else:
        lines += [""]
    lines += ["## Summary", "", "| figure | value | meaning |", "|---|---|---|"]
    if "best_plain" in summary:
        bp, ba = summary["best_plain"], summary["best_actors"]
        lines += [
            f"| `ray_overhead_ratio` | **{fmt(summary['ray_overhead_ratio'], 3)}** | best actors' epoch "
            f"({fmt(ba['samples_per_second'], 3)} samples/s) / best plain loop's ({bp['threads']} threads, reward on a "
            f"thread pool: {fmt(bp['samples_per_second'], 3)} samples/s); goal <= 1.0, section 0 |",
            f"| `ray_overhead_ratio_one_thread` | {fmt(summary.get('ray_overhead_ratio_one_thread'), 3)} | actors' "
            "epoch / plain loop's, both on one torch thread, 1 rollout actor (section 1) |",
        ] + [f"| UNet share of the matmul peak, plain loop at {k.split('_')[1]} thread(s) | sampling "
             f"{fmt(100 * v['sampling'], 1)}%, training {fmt(100 * v['training'], 1)}% | counted FLOPs / phase "
             "wall time / dense fp32 matmul rate on as many threads |" for k, v in summary["unet_peak_share"].items()]
    if "ray_overhead_ratio" in summary and "best_plain" not in summary:
        lines += [
            f"| `ray_overhead_ratio` | **{fmt(summary['ray_overhead_ratio'], 3)}** | actors' epoch / plain loop's "
            "epoch, 1 rollout actor (target <= 1.10) |",
        ]
    if "overlap_ratio" in summary:
        lines += [
            f"| `ray_overhead_cpu_ratio` | {fmt(summary.get('ray_overhead_cpu_ratio'), 3)} | CPU seconds per epoch of "
            "the whole process tree (driver, Ray's daemons, actors) / the plain loop's; less sensitive to other "
            "work on the machine than wall time |",
            f"| `overlap_ratio` | {fmt(summary['overlap_ratio'], 3)} | actors' epoch / (sample + reward + train + "
            "load) measured separately in the plain loop |",
            f"| `reward_hidden_share` | {fmt(100 * summary['reward_hidden_share'] if summary['reward_hidden_share'] is not None else None, 0)}% | "
            "share of the reward time hidden behind sampling (see section 2 for its ceiling) |",
        ]
        if "ray_overhead_ratio_2_rollout_workers" in summary:
            lines.append(f"| `ray_overhead_ratio_2_rollout_workers` | {fmt(summary['ray_overhead_ratio_2_rollout_workers'], 3)} | "
                         "actors' epoch with 2 rollout actors, one thread each / the one-thread plain loop's epoch (section 1) |")
    if summary.get("weight_sync_largest_full"):
        w = summary["weight_sync_largest_full"]
        lines.append(f"| weight sync, largest full | {fmt(w['seconds_median'], 3)} s | {w['model']}: "
                     f"{w['bytes'] / 1e6:.1f} MB, {fmt(w['mb_per_second'], 1)} MB/s |")
    if summary.get("weight_sync_broadcast_over_object_store"):
        b = summary["weight_sync_broadcast_over_object_store"]
        lines.append("| weight sync, broadcast / object store | " + ", ".join(f"{k}: {fmt(v, 2)}" for k, v in b.items())
                     + " | seconds per sync, side by side (train.weight_sync; gloo on this CPU) |")
    if "controller_overhead_seconds_per_epoch" in summary:
        o = summary["controller_overhead_seconds_per_epoch"]
        lines.append("| controller overhead per epoch | " + ", ".join(f"{n}: {fmt(v, 3)} s" for n, v in o.items())
                     + " | by rollout actor count (each actor samples the same number of batches, so an epoch "
                     f"holds N times more): {growth_words(summary.get('controller_overhead_growth_exponent'))} |")
        per_actor = summary.get("controller_overhead_ms_per_actor", {})
        lines.append("| controller overhead per actor | " + ", ".join(f"{n}: {fmt(v, 1)} ms" for n, v in per_actor.items())
                     + f" | by rollout actor count: {growth_words(summary.get('controller_overhead_per_actor_growth_exponent'))} |")
    lines.append("")

    best = d.get("best_loop")
    if best:
        from bench.best_loop import report as best_loop_report

        lines += [f"## 0. Against the best plain loop ({when(best)})", "",
                  "`python -m bench.best_loop`: the same work as section 1 (its model, reward, prompts and seeds), "
                  "the plain loop in ddpo-pytorch's shape (one process at each torch thread count, each batch's "
                  "reward on a thread pool next to sampling) against the actors at several thread and actor "
                  "settings; the first epoch of each is a warm-up, left out.", "", "```",
                  best_loop_report(best), "```", "", phase_gap_words(best), ""]
    ro = d.get("ray_overhead")
    if ro:
        s, p = ro["setup"], ro["plain"]
        lines += [
            f"## 1. Ray overhead ({when(ro)})", "",
            f"Same work on both sides: {s['model']} ({family_words(s.get('family'))}{s['finetune']}), reward {s['reward']}"
            + (f" (reconstructor {s['reconstructor']})" if s["reward"] == "mrc" else "")
            + f", alignment {s['alignment']}, {s['samples_per_epoch']} samples per epoch in "
            f"rollout batches of {s['batch_size']}, {s['sampling_steps']} sampling steps, {s['epochs']} epochs "
            f"(the first left out as warm-up), torch threads {s['torch_threads']} everywhere, local Ray with "
            f"{s['ray_num_cpus']} CPUs. The actors' times are the run's `metrics.parquet` columns; the plain "
            "loop calls the classes the actors wrap (`RolloutWorker`, `RewardWorker`, `Trainer`) in one process.", "",
            "| side | epoch s | sample s | reward s | train s | weights s | controller s | ratio to plain | CPU s | CPU ratio |",
            "|---|---|---|---|---|---|---|---|---|---|",
            f"| plain loop | {fmt(p['epoch_seconds'])} ± {fmt(p['epoch_seconds_std'])} | {fmt(p['sample_seconds'])} | "
            f"{fmt(p['reward_seconds'])} | {fmt(p['train_seconds'])} | {fmt(p['sync_seconds'], 3)} | - | 1 | "
            f"{fmt(p.get('cpu_seconds'), 1)} | 1 |",
        ]
        for workers, a in ro["actors"].items():
            lines.append(
                f"| actors, {workers} rollout | {fmt(a['epoch_seconds'])} ± {fmt(a['epoch_seconds_std'])} | "
                f"{fmt(a['sample_seconds'])} | tail {fmt(a['reward_tail_seconds'])} | {fmt(a['train_seconds'])} | "
                f"{fmt(a['sync_seconds'], 3)} | {fmt(a['controller_seconds'], 3)} | **{fmt(a['ratio_to_plain'], 3)}** | "
                f"{fmt(a.get('cpu_seconds'), 1)} | {fmt(a.get('cpu_ratio_to_plain'), 3)} |")
        lines += [
            "", "Per epoch (seconds, warm-up first):", "",
            f"- plain: {', '.join(fmt(x) for x in p['epoch_seconds_each'])}",
            *[f"- actors, {w} rollout: {', '.join(fmt(x) for x in a['epoch_seconds_each'])}"
              for w, a in ro["actors"].items()],
            "", "Same work check: per-epoch mean rewards, plain "
            + ", ".join(fmt(x, 4) for x in p["reward_mean_each"]) + "; "
            + "; ".join(f"actors ({w} rollout) " + ", ".join(fmt(x, 4) for x in a["reward_mean_each"])
                        + f" (max difference {a['reward_mean_max_abs_diff_to_plain']:.1e})"
                        for w, a in ro["actors"].items()) + ".", "",
            "'train' on the actors' side is the learner's whole `train` call (fetching the batches from the "
            "object store included); 'controller' is the rest of the actors' epoch: the driver's own work "
            "between the phases. 'CPU s' is the CPU time (user + system) per epoch of the plain loop's process, "
            "and on the actors' side of the whole process tree: the driver, Ray's daemons and every actor, "
            "from the end of one epoch to the end of the next (so it also holds the checkpoint and plots "
            "written between epochs, which the plain loop does not write).", "",
            "Cores used on average (CPU s / epoch s): plain loop "
            f"{fmt(ratio(p.get('cpu_seconds'), p['epoch_seconds']), 2)}; "
            + "; ".join(f"actors ({w} rollout) {fmt(ratio(a.get('cpu_seconds'), a['epoch_seconds']), 2)}"
                        for w, a in ro["actors"].items()) + "."
            + (" On a shared machine the wall-time ratio favours the actors: several processes together get a "
               "larger share of the contended cores than the plain loop's one process (and the reward actor "
               "runs beside the rollout actor). Here the CPU ratio is the better measure of what Ray costs; the "
               "wall-time ratio wants a quiet machine." if m.get("shared") else ""), "",
            "## 2. Overlap", "",
            f"- Plain loop, phases one after the other: sample {fmt(p['sample_seconds'])} + reward "
            f"{fmt(p['reward_seconds'])} + train {fmt(p['train_seconds'])} + load {fmt(p['sync_seconds'], 3)} = "
            f"{fmt(p['sum_of_phases_seconds'])} s.",
        ]
        for workers, a in ro["actors"].items():
            lines.append(
                f"- Actors, {workers} rollout: {fmt(a['epoch_seconds'])} s per epoch = "
                f"{fmt(a['ratio_to_plain_sum_of_phases'], 3)} x that sum; the reward work left after the last "
                f"batch was sampled is {fmt(a['reward_tail_seconds'])} s of the plain loop's "
                f"{fmt(p['reward_seconds'])} s: **{fmt(100 * a['reward_hidden_share'], 0)}% of the reward time is "
                "hidden behind sampling**.")
        batches = s["samples_per_epoch"] // s["batch_size"]
        ceiling = 1 - 1 / batches
        lines.append(f"- With {batches} rollout batches per epoch the last batch can only be scored once sampling is "
                     f"over, so a perfect overlap hides about {fmt(100 * ceiling, 0)}% of the reward time "
                     "(more batches per epoch, or smaller ones, hide more).")
        if any(a["reward_hidden_share"] > ceiling + 0.02 for a in ro["actors"].values()):
            lines.append("- The measured shares exceed that ceiling: the last batch took less time to score in the "
                         "reward actor (a process of its own) than the plain loop's reward phase took in its single "
                         "process (each under the outside load of its own time), so the two sides' reward times "
                         "are not equal here; on a quiet machine expect at most the ceiling.")
        if "2" in ro["actors"]:
            lines.append(f"- Two rollout actors against one: {fmt(ro.get('two_rollout_workers_speedup'), 2)} x faster "
                         f"epochs (on {m.get('logical_cpus')} logical CPUs, shared with the reward and learner actors).")
        lines.append("")
    ws = d.get("weight_sync")
    if ws:
        s = ws["setup"]
        lines += [
            f"## 3. Weight sync ({when(ws)})", "",
            f"`learner.driver.sync_weights` through the real roles: the learner puts its trainable weights in "
            f"the object store once, each of {s['rollout_workers']} rollout actor(s) loads them and acknowledges "
            "(`object_store`), or the learner broadcasts them into the actors' parameters in buckets over a gloo "
            "group (`broadcast`; NCCL between GPUs). "
            f"Median of {s['repeats']} syncs after the first. Models: the built-in tiny model, MiniCarve's "
            "sft-short, and the tiny architecture with wider UNets (random weights).", "",
            "| model | UNet parameters | finetune | sync | trainable parameters | MB per sync | median s | min-max s | MB/s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in sorted(ws["rows"], key=lambda r: (r["unet_parameters"], r["finetune"] != "lora", sync_key(r))):
            lines.append(f"| {r['model']} | {r['unet_parameters']:,} | {r['finetune']} | "
                         f"{r.get('weight_sync', 'object_store')} | {r['trainable_parameters']:,} | "
                         f"{r['bytes'] / 1e6:.2f} | {fmt(r['seconds_median'], 3)} | {fmt(r['seconds_min'], 3)}-"
                         f"{fmt(r['seconds_max'], 3)} | {fmt(r['mb_per_second'], 1)} |")
        store = [r for r in ws["rows"] if r.get("weight_sync", "object_store") == "object_store"]
        lora = [r for r in store if r["finetune"] == "lora"]
        full = sorted((r for r in store if r["finetune"] == "full"), key=lambda r: r["bytes"])
        if lora and full:
            lines += ["", f"LoRA syncs take {fmt(min(r['seconds_median'] for r in lora), 3)}-"
                      f"{fmt(max(r['seconds_median'] for r in lora), 3)} s whatever the model (under "
                      f"{max(r['bytes'] for r in lora) / 1e6:.1f} MB). Full syncs cost "
                      f"{fmt(full[0]['seconds_median'], 3)} s already at {full[0]['bytes'] / 1e6:.1f} MB (a fixed "
                      f"part: copying, pickling and loading every tensor, and the round trips) and "
                      f"{fmt(full[-1]['seconds_median'], 3)} s at {full[-1]['bytes'] / 1e6:.1f} MB "
                      f"({fmt(full[-1]['mb_per_second'], 0)} MB/s including that fixed part) through the "
                      "object store."]
        broadcast = sorted((r for r in ws["rows"] if r.get("weight_sync") == "broadcast" and r["finetune"] == "full"),
                           key=lambda r: r["bytes"])
        ratios = ws.get("broadcast_over_object_store") or {}
        if broadcast and ratios:
            lines += ["", f"The broadcast into the actors' parameters took {fmt(min(ratios.values()), 2)}-"
                      f"{fmt(max(ratios.values()), 2)} x the object store's time per sync on the same models, "
                      f"measured side by side; full weights {fmt(broadcast[-1]['seconds_median'], 3)} s at "
                      f"{broadcast[-1]['bytes'] / 1e6:.1f} MB ({fmt(broadcast[-1]['mb_per_second'], 0)} MB/s; "
                      "gloo over loopback here, NCCL between GPUs)."]
        lines += ["", "![weight sync](performance/weight_sync.png)", ""]
    cs = d.get("controller_scaling")
    if cs:
        s, f = cs["setup"], cs.get("flatness", {})
        lines += [
            f"## 4. Controller scaling, simulated ({when(cs)})", "",
            f"Stand-in actors (`bench/fake_actors.py`, {s['actor_num_cpus']} CPU each): `sample` sleeps "
            f"{s['sample_seconds']} s, `score` {s['score_seconds']} s; {s['batches_per_actor']} batches of "
            f"{s['batch_size']} per rollout actor per epoch, a reward pool of max(1, N/{s['rollout_per_reward']}); "
            f"the real `ActorGroup`s and `collect_epoch`, plus a weights object loaded by every rollout actor "
            f"before each epoch. {s['epochs']} epochs per size, the first left out. Ideal = the critical path "
            "with every actor always busy (`bench.common.ideal_epoch_seconds`).", "",
            "| rollout actors | reward actors | batches | ideal s | wall s | overhead s/epoch | overhead ms/actor | "
            "overhead ms/batch | driver CPU ms/batch | wall/ideal | sync s | actors' memory GiB | startup s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in cs["rows"]:
            lines.append(
                f"| {r['rollout_actors']} | {r['reward_actors']} | {r['batches_per_epoch']} | {fmt(r['ideal_seconds'], 3)} | "
                f"{fmt(r['wall_seconds'], 3)} | {fmt(r['overhead_seconds'], 3)} | {fmt(1e3 * r['overhead_per_actor_seconds'], 1)} | "
                f"{fmt(1e3 * r['overhead_per_batch_seconds'], 1)} | {fmt(r['driver_cpu_per_batch_ms'], 2)} | "
                f"{fmt(r['wall_over_ideal'], 3)} | {fmt(r['sync_seconds'], 3)} | {fmt(r['actor_pss_gib_total'], 2)} | "
                f"{fmt(r['startup_seconds'], 1)} |")
        lines += [""]
        if f:
            lines.append(
                f"From {f['actors_from_to'][0]} to {f['actors_from_to'][1]} rollout actors the overhead per epoch "
                f"goes x{fmt(f['overhead_per_epoch_growth'], 1)} (~ N^{fmt(f['overhead_growth_exponent'], 2)}): it "
                f"{growth_words(f['overhead_growth_exponent'])}; wall/ideal goes from "
                f"{fmt(f['wall_over_ideal_from_to'][0], 3)} to {fmt(f['wall_over_ideal_from_to'][1], 3)}, the "
                f"driver's CPU per batch from {fmt(f['driver_cpu_per_batch_ms_from_to'][0], 2)} to "
                f"{fmt(f['driver_cpu_per_batch_ms_from_to'][1], 2)} ms.")
        lines += ["", "Where the overhead goes (means after the warm-up epoch): the sampling phase against "
                  f"{s['batches_per_actor']} x {s['sample_seconds']} s, and the reward tail (scoring after the last "
                  "batch was sampled) against the ideal last round:", "",
                  "| rollout actors | sampling phase s | ideal s | reward tail s | ideal tail s | peak reward queue |",
                  "|---|---|---|---|---|---|"]
        for r in cs["rows"]:
            kept = r["epochs"][1:] or r["epochs"]
            ideal_sample = s["batches_per_actor"] * s["sample_seconds"]
            lines.append(f"| {r['rollout_actors']} | {fmt(sum(e['sample_seconds'] for e in kept) / len(kept), 3)} | "
                         f"{fmt(ideal_sample, 3)} | {fmt(sum(e['reward_tail_seconds'] for e in kept) / len(kept), 3)} | "
                         f"{fmt(r['ideal_seconds'] - ideal_sample, 3)} | "
                         f"{max(e['reward_queue_depth_max'] for e in kept)} |")
        lines += ["", "`ActorGroup` keeps at most 2 calls queued per actor (`max_in_flight`) and `collect_epoch` "
                  "refills the queues once per polling round (a rollout `poll` that waits up to 0.1 s for all "
                  "its calls, then a reward `poll` that does the same). Each reward actor can so take at most 2 "
                  "batches per round whatever its speed, and the reward queue grows once the rollout actors "
                  "finish more batches per round than twice the reward pool."]
        cpu_ms = [r["driver_cpu_per_batch_ms"] for r in cs["rows"]]
        lines.append(f"The driver's own CPU stays at {fmt(min(cpu_ms), 1)}-{fmt(max(cpu_ms), 1)} ms per batch (first "
                     "table): the growth is waiting in the polling rounds, which wait for all of a group's calls "
                     "(or 0.1 s) before refilling, rather than the driver's work.")
        for probe in d.get("controller_scaling_probes", []):
            depth = probe["setup"].get("reward_max_in_flight")
            cells = "; ".join(
                f"{r['rollout_actors']} actors: overhead {fmt(r['overhead_seconds'], 3)} s/epoch, reward tail "
                f"{fmt(sum(e['reward_tail_seconds'] for e in (r['epochs'][1:] or r['epochs'])) / max(1, len(r['epochs'][1:] or r['epochs'])), 3)} s, "
                f"sampling phase {fmt(sum(e['sample_seconds'] for e in (r['epochs'][1:] or r['epochs'])) / max(1, len(r['epochs'][1:] or r['epochs'])), 3)} s"
                for r in probe["rows"])
            lines.append(f"Probe (not the driver's setting): with {depth} calls queued per reward actor "
                         f"(`python -m bench.controller_scaling --reward-in-flight {depth} --actors "
                         f"{' '.join(str(r['rollout_actors']) for r in probe['rows'])}`, {when(probe)}): {cells}.")
        for note in cs.get("skipped", []):
            lines.append(f"Skipped: {note}.")
        lines += ["", "![controller scaling](performance/controller_scaling.png)", ""]
    gpu = d.get("gpu_throughput") or {}
    lines += ["## 5. GPU-only figures", ""]
    if gpu and not gpu.get("skipped") and not gpu.get("cpu_smoke"):
        lines.append(f"SDXL-size UNet, bf16, on {gpu['gpu']}: {fmt(gpu['guided_steps_per_second'])} guided steps/s "
                     f"at batch {gpu['batch']} (x2 for CFG), {fmt(gpu['images_per_second_at_50_steps'], 3)} images/s "
                     f"at 50 steps, forward+backward {fmt(gpu['forward_backward_seconds'], 3)} s, peak "
                     f"{fmt(gpu['peak_memory_gib'], 1)} GiB.")
    else:
        lines += [
            "Not measured: this machine has no GPU. SDXL bf16 throughput runs with",
            "", "```bash", GPU_COMMAND, "```", "",
            "on a CUDA node (`bench/gpu_throughput.py`: an SDXL-base-shaped UNet with random weights, so nothing "
            "is downloaded; guided denoising steps and forward+backward in bf16; it writes "
            "`docs/results/performance/gpu_throughput.json`, and `python -m bench.performance --only gpu_throughput` "
            "then adds it here). Weight sync over NCCL is not measured: the project syncs weights through Ray's "
            "object store only (section 3); there is no NCCL path to time.",
        ]
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fast smoke version; writes under runs/bench-quick/")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=None,
                        help="run these; read the others' figures from their last JSON")
    parser.add_argument("--shared", action="store_true", help="the machine was shared with other work")
    parser.add_argument("--note", default="", help="a note on the machine's state, for performance.md")
    parser.add_argument("--summarize", action="store_true",
                        help="run nothing: rewrite performance.{json,md} from the benchmarks' last JSON (the "
                             "machine as the last run recorded it; --note and --shared replace its note)")
    args = parser.parse_args(argv)
    bench_out = QUICK_OUT if args.quick else FULL_OUT
    summary_out = QUICK_OUT if args.quick else RESULTS
    command = ("python -m bench.performance" + (" --quick" if args.quick else "") + (" --shared" if args.shared else "")
               + (f" --only {' '.join(args.only)}" if args.only else ""))
    machine = machine_info(shared=args.shared, note=args.note)
    machine["time"] = time.time()
    previous = summary_out / "performance.json"
    if args.summarize and previous.exists():
        last = read_json(previous)
        machine = {**last["machine"], **({"note": args.note} if args.note else {}),
                   **({"shared": True} if args.shared else {})}
        command = last.get("command", command)
    wall = time.perf_counter()
    details = {}
    for name in BENCHMARKS:
        if not args.summarize and (args.only is None or name in args.only):
            log(f"=== {name} ===")
            start = time.perf_counter()
            details[name] = run_benchmark(name, args.quick, bench_out)
            log(f"=== {name} done in {time.perf_counter() - start:.0f} s ===")
        elif (bench_out / f"{name}.json").exists():
            details[name] = read_json(bench_out / f"{name}.json")
    probes = sorted(bench_out.glob("controller_scaling_reward_in_flight_*.json"))
    if probes:
        details["controller_scaling_probes"] = [read_json(path) for path in probes]
    if args.summarize and previous.exists():
        wall_seconds = last.get("wall_seconds") or 0.0
    else:
        machine["load_average_end"] = machine_info()["load_average_1_5_15"]
        wall_seconds = time.perf_counter() - wall
    summary = combine(details, machine)
    summary["wall_seconds"], summary["command"] = wall_seconds, command
    write_json(summary_out / "performance.json", summary)
    (summary_out / "performance.md").write_text(markdown(summary, command, wall_seconds))
    log(f"wrote {(summary_out / 'performance.json').relative_to(ROOT)} and performance.md "
        f"({wall_seconds / 60:.1f} min)")
    return summary


if __name__ == "__main__":
    main()
