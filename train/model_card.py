"""The model card (README.md) of an export: Hugging Face's front matter (library_name: timm, tags,
datasets, metrics and the model-index results, written by huggingface_hub's ModelCardData) and a
body saying what the weights are: the method and its attack, the recipe and the command that
trains it, the data and its preprocessing, the accuracies, and how to load it with timm.

results (train/model_export.py): clean_top1 [, clean_top5, robust_top1, robust_attack, val_images],
epoch, and `measured` (where the numbers come from); evaluations: tools/evaluate.py reports (--json)
of these weights, whose robust accuracies, ImageNet-C mCE and OOD sets the card adds.
"""
from __future__ import annotations

import sys
from pathlib import Path

from huggingface_hub import EvalResult, ModelCardData
from omegaconf import OmegaConf

from train.attacks import describe
from train.methods import METHODS

TASK = "image-classification"


def dataset_name(cfg) -> str:
    """The data set's name as the card's `datasets` gives it: digits, else its folder's name."""
    if cfg.data.dataset == "digits":
        return "digits"
    source = cfg.data.root or cfg.data.train_shards.split("{")[0]
    return Path(source.rstrip("/")).name or cfg.data.dataset


def model_card(cfg, classes: list[str], results: dict, *, architecture: str, preprocessing: dict,
               evaluations: list[dict] = (), load_name: str = "") -> str:
    """load_name: how a user names the model to timm (hf-hub:USER/NAME once pushed); "" → local-dir:."""
    data = dataset_name(cfg)
    title = f"{architecture} trained with {cfg.method} on {data}"
    card = ModelCardData(library_name="timm", pipeline_tag=TASK, datasets=[data], metrics=["accuracy"],
                         tags=[TASK, "timm", "adversarial-training", cfg.method.replace("_", "-")],
                         model_name=title, eval_results=eval_results(data, results, evaluations) or None)
    sections = [f"# {title}", summary(cfg, classes, results, architecture), method_section(cfg),
                results_section(results, evaluations), data_section(cfg, classes, results, preprocessing),
                recipe_section(cfg), usage_section(load_name)]
    return f"---\n{card.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"


def eval_results(data: str, results: dict, evaluations: list[dict]) -> list[EvalResult]:
    def result(value, name, dataset=data, metric="accuracy"):
        return EvalResult(task_type=TASK, dataset_type=dataset, dataset_name=f"{dataset} (val)",
                          dataset_split="val", metric_type=metric, metric_value=round(value, 2), metric_name=name)
    found = [result(results["clean_top1"], "clean top-1")] if "clean_top1" in results else []
    if "robust_top1" in results:
        found.append(result(results["robust_top1"], f"robust top-1 ({results['robust_attack']})"))
    for report in evaluations:
        found += [result(r["top1"], f"robust top-1 ({r['attack']})") for r in report.get("robust", [])]
        if "imagenet_c" in report:
            found.append(result(report["imagenet_c"]["mce"], "mCE", "imagenet-c", "mce"))
    return found


def summary(cfg, classes: list[str], results: dict, architecture: str) -> str:
    norms = ("It was trained with auxiliary norms for the adversarial images; this export holds the main "
             "norms (the route clean images take), in the plain timm architecture."
             if METHODS[cfg.method].dual_norm else "")
    return (f"A `{architecture}` classifier of {len(classes)} classes trained with **{cfg.method}** on "
            f"{dataset_name(cfg)} for {results['epoch']} epochs (of {cfg.epochs}). {norms} Its inputs are RGB images preprocessed "
            f"as its `config.json` says (timm applies it: see *How to load it*).").replace("  ", " ")


def method_section(cfg) -> str:
    record = METHODS[cfg.method]
    doc = (sys.modules[record.step.__module__].__doc__ or cfg.method).strip().splitlines()[0]
    lines = ["## Method and attack", "", f"- method: {doc}"]
    if record.attacks:
        attack = cfg.attack
        _, title = describe(attack)  # the attack's record says what it is (its evaluation title: untargeted)
        lines.append(f"- training attack: {title.removesuffix(' untargeted')}, "
                     f"{'targeted (random target classes)' if attack.targeted else 'untargeted'}, "
                     f"on the model in {attack.bn_mode} mode (its keys: the recipe below)")
    else:
        lines.append("- no attack in training")
    return "\n".join(lines)


def results_section(results: dict, evaluations: list[dict]) -> str:
    rows = [(name, results.get(key)) for name, key in (("clean top-1", "clean_top1"), ("clean top-5", "clean_top5"))]
    if "robust_top1" in results:
        rows.append((f"robust top-1, {results['robust_attack']}", results["robust_top1"]))
    rows = [(name, value) for name, value in rows if value is not None]
    images = f" ({results['val_images']} images)" if results.get("val_images") else ""
    measured = results.get("measured", "not measured: the run recorded no validation of these weights")
    lines = ["## Results", "", f"On the validation split{images}, {measured}" + (":" if rows else "."), ""]
    lines += ["| metric | % |", "|---|---|"] + [f"| {name} | {value:.2f} |" for name, value in rows] if rows else []
    for report in evaluations:
        lines += ["", f"tools/evaluate.py on {report['model']['path']} "
                      f"({report['model']['image_size']} px, crop ratio {report['model']['crop_ratio']:g}):", "",
                  "| set | metric | % |", "|---|---|---|"]
        lines += [f"| {name} | top-1 | {report[key]['top1']:.2f} |" for key, name in
                  (("clean", "clean"), ("imagenet_a", "ImageNet-A"), ("imagenet_r", "ImageNet-R"),
                   ("stylized", "Stylized-ImageNet")) if key in report]
        lines += [f"| {r['attack']} | robust top-1 | {r['top1']:.2f} |" for r in report.get("robust", [])]
        if "imagenet_c" in report:
            lines.append(f"| ImageNet-C | mCE (AlexNet-normalised) | {report['imagenet_c']['mce']:.2f} |")
        if "corrupted" in report:
            lines.append(f"| corruptions synthesised from val | mean corruption error (not normalised) | "
                         f"{report['corrupted']['mean_corruption_error']:.2f} |")
    return "\n".join(lines)


def data_section(cfg, classes: list[str], results: dict, preprocessing: dict) -> str:
    names = ", ".join(classes[:20]) + (f", … ({len(classes)} in all)" if len(classes) > 20 else "")
    size = preprocessing["input_size"][-1]
    return "\n".join([
        "## Data", "",
        f"- data set: {dataset_name(cfg)} (`data.dataset={cfg.data.dataset}`, loader {cfg.loader})",
        f"- classes (`label_names` in config.json, in output order): {names}",
        f"- training: random resized crops of {cfg.data.image_size} px (scale ≥ {cfg.data.min_scale:g})"
        + (", horizontal flips" if cfg.data.hflip else "") + (f", AutoAugment {cfg.data.auto_augment}"
                                                               if cfg.data.auto_augment else ""),
        f"- validation (what `config.json` records): resize the shorter side ({preprocessing['interpolation']}), "
        f"center crop {size} px (crop_pct {preprocessing['crop_pct']:.4g}), normalise with mean "
        f"{tuple(preprocessing['mean'])} and std {tuple(preprocessing['std'])}"])


def recipe_section(cfg) -> str:
    optimizer, schedule = cfg.optimizer, cfg.schedule
    settings = OmegaConf.to_yaml(cfg, resolve=True)
    return "\n".join([
        "## Recipe", "",
        f"- {cfg.epochs} epochs, batch {cfg.batch_size} per process, optimizer {optimizer.name} "
        f"(lr {optimizer.lr_per_256:g} per 256 images, momentum {optimizer.momentum:g}, weight decay "
        f"{optimizer.weight_decay:g}), {schedule.name} schedule with {schedule.warmup_epochs:g} warm-up epochs",
        f"- label smoothing {cfg.label_smoothing:g}, EMA decay {cfg.ema_decay:g}, drop rate {cfg.drop_rate:g}, "
        f"drop path rate {cfg.drop_path_rate:g}, seed {cfg.seed}", "",
        "Trained by the AdvProp trainer (`train/run.py`); its settings (below: save them as `config.yaml`) train "
        "it again:", "",
        "```bash", "accelerate launch --config_file accelerate_config.yaml train/run.py config=config.yaml "
        "output_dir=runs/again  # data.root=… where your copy of the data is", "```", "",
        "<details><summary>config.yaml</summary>", "", "```yaml", settings.rstrip(), "```", "", "</details>"])


def usage_section(load_name: str) -> str:
    name = load_name or "local-dir:PATH/TO/THIS/FOLDER"
    return "\n".join([
        "## How to load it", "",
        "With timm alone: its own transform applies the preprocessing above.", "",
        "```python", "import timm", "from PIL import Image", "",
        f'model = timm.create_model("{name}", pretrained=True).eval()',
        "transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))",
        'logits = model(transform(Image.open("image.png").convert("RGB")).unsqueeze(0))',
        'print(model.pretrained_cfg["label_names"][logits.argmax().item()])', "```"]
        + ([] if load_name else ["", "Once pushed to the Hugging Face Hub, `hf-hub:USER/NAME` names it the same way."]))
