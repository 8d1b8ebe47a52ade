"""bench/results/quality.md from the summary: one section per task, then the junk member."""

from __future__ import annotations

from typing import Any

from bench.common import machine_line, table
from bench.quality.grid import LABELS


def _ci(item: dict[str, Any] | None, digits: int = 3) -> str:
    if not item:
        return "-"
    return f"{item['mean']:.{digits}f} [{item['low']:.{digits}f}, {item['high']:.{digits}f}]"


def _diff(item: dict[str, Any] | None, scale: float, digits: int) -> str:
    if not item:
        return "-"
    mark = " *" if item["low"] > 0 or item["high"] < 0 else ""
    mean, low, high = (item[k] * scale for k in ("mean", "low", "high"))
    return f"{mean:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]{mark}"


def _num(value: float | int | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _bytes(value: float) -> str:
    if value == 0:
        return "0"
    return f"{value / 1024:,.1f} KiB" if value < 1024 * 1024 else f"{value / 1024 / 1024:,.2f} MiB"


def render(report: dict[str, Any]) -> str:
    lines = [
        "# Quality: semantic consensus against baselines, with intervals",
        "",
        f"Grid: `{report['grid']}`{' (--quick)' if report['quick'] else ''}; seeds {report['seeds']}; "
        f"{report['resamples']} bootstrap resamples (seeds, then prompts within a seed; 95% percentile "
        "intervals).",
        "",
        "NLL: mean negative log-likelihood per token of the reference answer (teacher forced, nats; lower is "
        "better) on the whole test set after the last round. ROUGE-L F1 (0-1) and embedding similarity "
        "(MiniLM cosine) of greedy answers after the last round on a fixed subset of the test set, the same "
        "for every method. A method's score on a prompt is the mean over its participants' models. "
        "Differences are method minus baseline on the same prompts and seeds; ROUGE-L differences in "
        "points (x100); * marks an interval that excludes 0.",
        "",
    ]
    if report.get("shipped_problem"):
        lines += [f"Shipped recipe not run: {report['shipped_problem']}", ""]
    for task, summary in report["tasks"].items():
        lines += _task_section(task, summary)
    junk = report.get("junk_member")
    if junk:
        lines += _junk_section(junk)
    for members in report.get("members") or []:
        lines += _members_section(members)
    refusal = report.get("fedavg_refusal")
    if refusal:
        lines += [
            f"## FedAvg on task {refusal['task']} (seed {refusal['seed']})",
            "",
            _fedavg_line(refusal.get("fedavg") or {}, "the same federation"),
            "",
        ]
    lines += [
        "",
        machine_line(report["machine"]),
        f"Wall time of this invocation: {report['wall_seconds']:.0f} s.",
        "",
    ]
    return "\n".join(lines)


def _task_section(task: str, summary: dict[str, Any]) -> list[str]:
    methods = summary["methods"]
    lines = [
        f"## Task {task}",
        "",
        f"Test set: {summary['test_prompts']} prompts (generation subset {summary['generation_prompts']}); "
        f"identical for every method of a seed: {summary['same_test_set_per_seed']}.",
        "",
    ]
    rows = []
    for method, item in methods.items():
        rows.append(
            [
                LABELS[method],
                ",".join(str(s) for s in item["seeds"]),
                _ci(item["nll"]),
                _ci(item["rouge_l"]),
                _ci(item["embedding_similarity"]),
                " → ".join(_num(v) for v in item["subset_nll_by_round"]),
                _bytes(item["bytes_per_participant_per_round"]),
                f"{item['seconds']['train']:.0f} + {item['seconds']['score']:.0f}",
            ]
        )
    header = [
        "method",
        "seeds",
        "NLL",
        "ROUGE-L",
        "emb sim",
        "subset NLL by round",
        "bytes/participant/round",
    ]
    lines += table([*header, "train + score s"], rows)
    diffs = summary["differences"]
    if diffs:
        lines += ["", "Differences (method − baseline):", ""]
        drows = []
        for method, against in diffs.items():
            for baseline, item in against.items():
                drows.append(
                    [
                        LABELS[method],
                        LABELS[baseline],
                        _diff(item["nll"], 1.0, 3),
                        _diff(item["rouge_l"], 100.0, 2),
                        _diff(item["embedding_similarity"], 100.0, 2),
                    ]
                )
        lines += table(
            ["method", "vs", "ΔNLL (lower better)", "ΔROUGE-L (points)", "Δemb sim (points)"], drows
        )
    quality = summary["label_quality"]
    if quality:
        lines += [
            "",
            "Label quality (ROUGE-L of each label against the public prompt's reference; pooled over seeds):",
            "",
        ]
        qrows = []
        for method, rounds in quality.items():
            for key, row in rounds.items():
                qrows.append(
                    [
                        LABELS[method],
                        key,
                        str(row["labelled"]),
                        str(row["abstained"]),
                        _num(row["label"]),
                        _num(row["members_mean"]),
                        _num(row["oracle"]),
                        f"{row['beat_mean']}/{row['labelled']}",
                    ]
                )
        lines += table(
            ["method", "round", "labelled", "abstained", "label", "members' mean", "oracle", "beat mean"],
            qrows,
        )
    own_data = summary.get("own_data")
    if own_data:
        lines += [
            "",
            "Precondition, after the warm-up: ROUGE-L of answers to a member's private prompts, by its own "
            "model and (mean) by the others' (members should know their own data better):",
            "",
        ]
        lines += table(
            ["member's data", "its own model", "the others' models", "own − others"],
            [
                [owner, _num(row["own"]), _num(row["others"]), f"{row['own'] - row['others']:+.3f}"]
                for owner, row in own_data.items()
            ],
        )
    ratio = summary.get("fedavg_to_semantic_bytes")
    if ratio:
        lines += [
            "",
            f"FedAvg moved {ratio:,.0f}× the bytes of semantic consensus per participant per round.",
        ]
    lines.append("")
    return lines


def _junk_section(junk: dict[str, Any]) -> list[str]:
    lines = [
        f"## Robustness to a junk member (task {junk['task']}, seed {junk['seed']})",
        "",
        "Semantic consensus with one participant replaced by a random-weight tiny GPT-2 that answers noise; "
        "the others beside their own local-only scores on the same task and seed.",
        "",
    ]
    rows = [
        [
            pid,
            row["model"],
            _num(row.get("nll")),
            _num(row.get("local_only_nll")),
            _num(row.get("rouge_l")),
            _num(row.get("local_only_rouge_l")),
        ]
        for pid, row in junk["participants"].items()
    ]
    lines += table(["participant", "model", "NLL", "local-only NLL", "ROUGE-L", "local-only ROUGE-L"], rows)
    quality = (junk.get("label_quality") or {}).get("overall")
    if quality:
        lines += [
            "",
            f"Labels: {quality['labelled']} labelled, {quality['abstained']} abstained; label ROUGE-L "
            f"{_num(quality['label'])} vs members' mean {_num(quality['members_mean'])}.",
        ]
    fedavg = junk.get("fedavg")
    if fedavg:
        lines += ["", _fedavg_line(fedavg, "the same federation")]
    if junk.get("error"):
        lines += ["", f"Error: {junk['error']}"]
    lines.append("")
    return lines


def _fedavg_line(fedavg: dict[str, Any], what: str) -> str:
    round_1 = fedavg.get("round_1") or {}
    return (
        f"FedAvg on {what} (one round, deadline {fedavg.get('deadline_seconds')} s): "
        f"adapters stored from {fedavg.get('stored_adapters')}, "
        f"dead-lettered {fedavg.get('dead_lettered')} ({fedavg.get('rejections')}); "
        f"shards {round_1.get('shard_status', '-')}, answered {round_1.get('answered', '-')}, "
        f"missing {round_1.get('missing', '-')}; an average was published: "
        f"{fedavg.get('aggregated_adapter_published')}; averaging directly: {fedavg.get('average_wire')}"
        + (f"; run error: {fedavg['run_error']}" if fedavg.get("run_error") else "")
    )


def _members_section(members: dict[str, Any]) -> list[str]:
    methods = members["methods"]
    lines = [
        f"## Every member beside its own local-only scores (task {members['task']}, seed {members['seed']})",
        "",
        "NLL (lower is better) and ROUGE-L per member after the last round; each member trains as its "
        "`learner` column says.",
        "",
    ]
    header = ["member", "model", "learner"]
    header += [f"{LABELS[m]} NLL" for m in methods] + [f"{LABELS[m]} ROUGE-L" for m in methods]
    rows = [
        [pid, row["model"], row["learner"] or "-"]
        + [_num((row.get(m) or {}).get("nll")) for m in methods]
        + [_num((row.get(m) or {}).get("rouge_l")) for m in methods]
        for pid, row in members["participants"].items()
    ]
    return [*lines, *table(header, rows), ""]
