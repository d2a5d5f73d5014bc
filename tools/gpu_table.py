"""The GPU table from tools/bench_gpu.py's results: one row per figure of the GPU table (docs/speed.md),
measured beside its target; a part that did not run says why instead of a figure."""
from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from pathlib import Path

NAN_TESTS = "test_nonfinite_cuda"  # the module of the tests that put a NaN into real CUDA steps


def tests_outcome(junit_xml: Path) -> dict | None:
    """{"passed": n, "failed": n, "skipped": n, "seconds": s, "tests": {name: outcome}} from pytest's JUnit XML."""
    if not junit_xml.is_file():
        return None
    suite = ElementTree.parse(junit_xml).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    tests = {}
    for case in suite.iter("testcase"):
        outcome = "passed"
        for child, name in (("failure", "failed"), ("error", "failed"), ("skipped", "skipped")):
            if case.find(child) is not None:
                outcome = name
        tests[f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"] = outcome
    counts = {k: sum(v == k for v in tests.values()) for k in ("passed", "failed", "skipped")}
    return {**counts, "seconds": float(suite.get("time", 0)), "tests": tests}


def table(results: dict) -> str:
    parts = results.get("parts", {})

    def part(name: str) -> dict:
        """The part's figures when it ran to the end, else {}."""
        return (results.get(name) or {}) if parts.get(name, {}).get("status") == "ok" else {}

    def figure(name: str, key: str, spec: str = ".2f") -> str:
        value = part(name).get(key)
        if value is not None:
            return format(value, spec)
        return parts[name]["status"] if name in parts and parts[name]["status"] != "ok" else "–"

    rows = [
        ("vanilla ResNet-50 b256 bf16 channels-last, model only, img/s: eager / compiled",
         f"{figure('steps', 'vanilla_img_per_s', '.0f')} / {figure('compiled', 'vanilla_img_per_s', '.0f')}",
         "≥ 5,000"),
        ("one attack step ÷ vanilla step: eager / compiled",
         f"{figure('steps', 'attack_step')} / {figure('compiled', 'attack_step')}", "≤ 0.80"),
        ("advprop PGD-1 / PGD-5 × vanilla, eager",
         f"{figure('steps', 'advprop_pgd1')} / {figure('steps', 'advprop_pgd5')}", "≤ 2.6 / ≤ 6.0"),
        ("advprop PGD-1 / PGD-5 × vanilla, compiled",
         f"{figure('compiled', 'advprop_pgd1')} / {figure('compiled', 'advprop_pgd5')}", "≤ 2.6 / ≤ 6.0"),
        ("fast_advprop × vanilla, ResNet-50 / EfficientNet-B0, eager",
         f"{figure('steps', 'fast_advprop')} / {figure('effnet', 'fast_advprop')}", "≤ 1.2 / ≤ 1.3"),
        ("fast_advprop × vanilla, ResNet-50 / EfficientNet-B0, compiled",
         f"{figure('compiled', 'fast_advprop')} / {figure('effnet_compiled', 'fast_advprop')}", "≤ 1.2 / ≤ 1.3"),
        ("advprop PGD-1 / PGD-5 × vanilla, EfficientNet-B0, eager",
         f"{figure('effnet', 'advprop_pgd1')} / {figure('effnet', 'advprop_pgd5')}", "–"),
        ("vanilla img/s with the host-side non-finite check (advprop PGD-1 run)",
         figure("steps_host_check", "vanilla_img_per_s", ".0f"), "–"),
        train_row(part("train"), part("steps").get("vanilla_img_per_s"), figure),
        loader_row("", part, figure),
        loader_row("v0", part, figure),
        effnet_epoch_row(part, figure),
        nan_row(results.get("tests"), parts.get("tests", {}).get("status")),
        ("compile time of the step, ResNet-50 (warm-up beyond steady steps)",
         ", ".join(f"{k} {v:.0f} s" for k, v in (part("compiled").get("compile_seconds") or {}).items())
         or figure("compiled", "compile_seconds"), "reported"),
        tests_row(results.get("tests"), parts.get("tests", {})),
    ]
    lines = [header(results), "", "| figure | measured | target |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    not_ok = {name: p["status"] for name, p in parts.items() if p["status"] != "ok"}
    if not_ok:
        lines += ["", "Parts that did not finish: " + "; ".join(f"{k}: {v}" for k, v in not_ok.items())]
    outcomes = (results.get("tests") or {}).get("tests") or {}
    failed = [name for name, outcome in outcomes.items() if outcome == "failed"]
    if failed:
        lines += ["", "Failed GPU tests: " + ", ".join(failed)]
    return "\n".join(lines)


def header(results: dict) -> str:
    v = results.get("versions") or {}
    text = (f"{v.get('card', '?')}, driver {v.get('driver')}, Python {v.get('python')}, torch {v.get('torch')} "
            f"(CUDA {v.get('cuda')}, cuDNN {v.get('cudnn')}), DALI {v.get('nvidia.dali')}, FFCV {v.get('ffcv')}, "
            f"timm {v.get('timm')}, accelerate {v.get('accelerate')}")
    if results.get("dry_run"):
        text = "DRY RUN on the CPU with tiny sizes: the figures say only that every part ran.\n" + text
    return text


def train_row(train: dict, model_only, figure) -> tuple[str, str, str]:
    steady = train.get("steady_img_per_s")
    wait = train.get("data_wait_fraction")
    ratio = format(steady / model_only, ".2f") if steady and model_only else figure("train", "steady_img_per_s")
    measured = f"{ratio} ({steady:.0f} img/s, waiting for data {100 * wait:.1f} %)" if steady and wait is not None \
        else ratio
    return "train/run.py vanilla, DALI, 18,000 photos: steady ÷ model-only img/s", measured, "≥ 0.9"


def loader_row(policy: str, part, figure) -> tuple[str, str, str]:
    cells = []
    for size in ("small", "large"):
        name = f"loaders_{size}" + (f"_{policy}" if policy else "")
        runs = part(name)
        cells.append(f"{runs['dali_ratio']:.2f} ({runs['dali']:.0f} vs {runs['torchvision']:.0f} img/s)"
                     if "dali_ratio" in runs else figure(name, "dali_ratio"))
    label = "DALI ÷ torchvision, 1,800 / 18,000 photos, 16 workers" + (f", AutoAugment {policy}" if policy else "")
    return label, " / ".join(cells), "≥ 1.5"


def effnet_epoch_row(part, figure) -> tuple[str, str, str]:
    cells = []
    for name in ("effnet_epoch", "effnet_epoch_compiled"):
        run = part(name)
        if run:
            graphs = f", {run['compile_graphs']} graphs" if run.get("compile_graphs") is not None else ""
            cells.append(f"ok, {run['train_img_per_s']:.0f} img/s, top-1 {run['clean_top1']:.1f} %{graphs}")
        else:
            cells.append(figure(name, "train_img_per_s"))
    return ("EfficientNet-B0 AdvProp recipe, one epoch of 1,800 photos, DALI + v0 on the GPU: eager / compile=true",
            " / ".join(cells), "runs")


def nan_row(tests: dict | None, status: str | None) -> tuple[str, str, str]:
    outcomes = [outcome for name, outcome in ((tests or {}).get("tests") or {}).items() if NAN_TESTS in name]
    counts = {outcome: outcomes.count(outcome) for outcome in ("passed", "failed", "skipped") if outcome in outcomes}
    measured = ", ".join(f"{n} {outcome}" for outcome, n in counts.items()) + f" ({NAN_TESTS}.py)" if outcomes \
        else (status or "–")
    return "NaN injected into CUDA steps, device-side guard: no-op step, the run says so", measured, "passed"


def tests_row(tests: dict | None, part: dict) -> tuple[str, str, str]:
    if not tests:
        return "pytest -m gpu", part.get("status", "–"), "passes, < 120 s"
    measured = (f"{tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped in "
                f"{part.get('seconds', tests['seconds']):.0f} s")
    return "pytest -m gpu (beside the compiled EfficientNet epoch)", measured, "passes, < 120 s"
