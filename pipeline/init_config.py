"""`python -m pipeline init`: write a complete, validated config for a researcher's own data and weights.

It looks at the dataset (which splits exist, how many classes the training split has), picks the
training split (`train` if present, else the first) and the evaluation split (the first of test /
val / validation, else the last), and writes every split key explicitly. Model sizes come from a
base config (`configs/default.yaml`: tiny CPU demo; `configs/imagenet_*.yaml`: the paper's sizes);
the tokenizers are either given weights (DINOv2 `.pth`, taming-format VQGAN `.ckpt`: checked to
exist, never loaded) or the tiny ones the DAG trains. The YAML carries a comment above every
top-level section and is validated with `config.validate_config` before it is written.
"""
from __future__ import annotations

import copy
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from .config import ConfigError, evaluation_split, load_schema, training_split, validate_config
from .io import write_bytes_atomic
from .sources import FASHION_MNIST_CLASSES, IMAGE_EXTENSIONS, list_fashion_mnist, tar_members

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
BASES = {"tiny": "default.yaml", "imagenet_base": "imagenet_base.yaml", "imagenet_large": "imagenet_large.yaml"}
TINY_BASE = "tiny"
PAPER_BASE = "imagenet_base"      # where the DINOv2 views and the loaded-VQ section come from
SPLIT_NAME = re.compile(r"^[A-Za-z0-9_]+$")
WEBDATASET_SCAN_TARS = 2          # tars of the training split read for labels (a lower bound beyond)
F16_CH_MULT = [1, 1, 2, 2, 4]     # a tiny VQGAN at 256 px with taming's f16 levels: a 16x16 grid
# Top-level sections after run and dataset, in configs/default.yaml's order: copied from the base
# config, except encoder and vq (built here from the weights given).
SECTIONS = ("shards", "encoder", "kmeans", "tokens", "train", "sample", "probe", "vq", "stage2", "stage2_nar",
            "maskgit", "kl", "mar", "mar_causal", "evaluate", "generators")
REQUIRED_SECTIONS = ("shards", "kmeans", "tokens", "train", "probe", "stage2", "stage2_nar", "maskgit", "mar",
                     "mar_causal", "evaluate")   # written even if the base leaves them to the defaults: they name splits
DEFAULT_ENCODER_ARCH = "dinov2_vitb14_reg4"   # DiGIT-base's encoder
DEFAULT_VQ_PRESET = "mage_vqgan"              # the VQGAN DiGIT decodes with
SOURCE_FLAGS = {"imagefolder": "--imagefolder", "webdataset": "--webdataset", "fashion_mnist": "--fashion-mnist"}


@dataclass
class DatasetInfo:
    """What `init` found in the dataset."""
    source: str
    path: Path
    splits: list[str]                  # every split found, in listing order
    num_classes: int
    classes_note: str                  # how the class count was found
    lower_bound: bool = False          # num_classes counts only the labels of the tars that were read
    image_format: str = "png"
    label_key: str = "cls"

    @property
    def classes_text(self) -> str:
        return f"{'at least ' if self.lower_bound else ''}{self.num_classes} classes ({self.classes_note})"

    @property
    def train_split(self) -> str:
        return training_split(self.splits)

    @property
    def eval_split(self) -> str:
        return evaluation_split(self.splits)

    @property
    def used_splits(self) -> list[str]:
        """The training split, then the evaluation split."""
        return list(dict.fromkeys([self.train_split, self.eval_split]))


# ---------------------------------------------------------------- looking at the dataset

def _dataset_flag(imagefolder, webdataset, fashion_mnist) -> tuple[str, str]:
    """(source, path as given) of the one dataset flag; ConfigError unless exactly one is set."""
    given = {src: path for src, path in (("imagefolder", imagefolder), ("webdataset", webdataset),
                                         ("fashion_mnist", fashion_mnist)) if path is not None}
    if len(given) != 1:
        got = f"; got {' and '.join(SOURCE_FLAGS[s] for s in given)}" if given else ""
        raise ConfigError("init needs exactly one dataset source: --imagefolder PATH, --webdataset PATH or "
                          f"--fashion-mnist [PATH]{got}")
    source, path = next(iter(given.items()))
    if source == "fashion_mnist" and path == "":
        path = load_schema()["properties"]["dataset"]["properties"]["path"]["default"]
    return source, path


def _split_folders(root: Path, flag: str, layout: str) -> list[Path]:
    """The visible sub-folders of a dataset root (its splits), sorted; errors name the flag."""
    if not root.is_dir():
        raise ConfigError(f"{flag}: no such folder: {root}")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ConfigError(f"{flag}: no split folders in {root} (expected {layout}, e.g. train/ and val/)")
    for p in folders:
        if not SPLIT_NAME.match(p.name):
            raise ConfigError(f"{flag}: split folder {p} is not a valid split name (letters, digits and _ only); "
                              "rename or move it")
    return folders


def _class_folders(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _first_image(split_dir: Path, classes: list[str]) -> Path | None:
    """The first image file of the first class folder that holds one (stops early: cheap at any size)."""
    for name in classes:
        for dirpath, _, files in os.walk(split_dir / name):
            for f in sorted(files):
                if Path(f).suffix.lower() in IMAGE_EXTENSIONS:
                    return Path(dirpath) / f
    return None


def _image_format(suffix: str) -> str:
    """How shards store the images: JPEG sources stay JPEG (passthrough), everything else PNG."""
    return "jpg" if suffix.lower().lstrip(".") in ("jpg", "jpeg") else "png"


def inspect_imagefolder(root: Path) -> DatasetInfo:
    """Splits = sub-folders of root; classes = the class folders of the training split. Every split must
    hold the same class folders (labels are the index of the sorted class folder)."""
    flag, layout = "--imagefolder", f"{root}/<split>/<class>/<images>"
    splits = [p.name for p in _split_folders(root, flag, layout)]
    classes = {}
    for split in splits:
        classes[split] = _class_folders(root / split)
        if not classes[split]:
            raise ConfigError(f"{flag}: split folder {root / split} has no class folders (expected "
                              f"{root / split}/<class>/<images>; is {root} itself one split?)")
    info = DatasetInfo("imagefolder", root, splits, 0, "")
    train = classes[info.train_split]
    for split in info.used_splits:
        if classes[split] != train:
            missing, extra = sorted(set(train) - set(classes[split])), sorted(set(classes[split]) - set(train))
            raise ConfigError(f"{flag}: split '{split}' has other class folders than '{info.train_split}' (missing: "
                              f"{', '.join(missing[:5]) or '-'}; extra: {', '.join(extra[:5]) or '-'}); labels are the "
                              "index of the sorted class folder, so every split needs the same classes")
    first = _first_image(root / info.train_split, train)
    if first is None:
        raise ConfigError(f"{flag}: no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root / info.train_split}")
    info.num_classes = len(train)
    info.classes_note = f"the class folders of split '{info.train_split}'"
    info.image_format = _image_format(first.suffix)
    return info


def _scan_tar(tar_path: Path, label_key: str) -> tuple[set[int], str | None]:
    """(integer labels, extension of the first image member) of one WebDataset tar."""
    texts, image_ext = {}, None
    try:
        for tar, info in tar_members(tar_path):
            ext = Path(info.name).name.partition(".")[2].lower()
            if ext == label_key:
                texts[info.name] = tar.extractfile(info).read().decode(errors="replace").strip()
            elif image_ext is None and ext in ("jpg", "jpeg", "png", "webp"):
                image_ext = ext
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--webdataset: unreadable tar {tar_path}: {exc}") from None
    bad = next(((member, t) for member, t in texts.items() if not re.fullmatch(r"-?\d+", t)), None)
    if bad:
        raise ConfigError(f"--webdataset: {tar_path}: member {bad[0]} holds {bad[1][:20]!r}, not an integer label")
    return {int(t) for t in texts.values()}, image_ext


def inspect_webdataset(root: Path, label_key: str = "cls") -> DatasetInfo:
    """Splits = sub-folders holding *.tar; classes = distinct labels of the first tars of the training
    split (a lower bound when there are more tars)."""
    flag = "--webdataset"
    folders = _split_folders(root, flag, f"{root}/<split>/*.tar")
    for p in folders:
        if not any(p.glob("*.tar")):
            raise ConfigError(f"{flag}: split folder {p} has no .tar files (expected {p}/*.tar)")
    info = DatasetInfo("webdataset", root, [p.name for p in folders], 0, "", label_key=label_key)
    tars = sorted((root / info.train_split).glob("*.tar"))
    scanned = tars[:WEBDATASET_SCAN_TARS]
    labels, image_ext = set(), None
    for tar_path in scanned:
        found, ext = _scan_tar(tar_path, label_key)
        labels |= found
        image_ext = image_ext or ext
    if image_ext is None:
        raise ConfigError(f"{flag}: no image members (.jpg, .jpeg, .png, .webp) in {', '.join(map(str, scanned))}")
    if not labels:
        raise ConfigError(f"{flag}: no '.{label_key}' label members in {', '.join(map(str, scanned))}; "
                          "pass --label-key EXT (the member extension that holds the integer label)")
    info.num_classes, info.lower_bound = len(labels), len(scanned) < len(tars)
    where = f"the first {len(scanned)} of {len(tars)} tars" if info.lower_bound else f"all {len(tars)} tars"
    info.classes_note = (f"distinct '.{label_key}' labels, from {min(labels)} to {max(labels)}, in {where} of split "
                         f"'{info.train_split}'")
    info.image_format = _image_format(image_ext)
    return info


def inspect_fashion_mnist(root: Path) -> DatasetInfo:
    """Fashion-MNIST idx files: splits train and test, 10 classes (the files' headers are checked)."""
    if not root.is_dir():
        raise ConfigError(f"--fashion-mnist: no such folder: {root}")
    splits = ["train", "test"]
    for split in splits:
        try:
            list_fashion_mnist(root, split)   # reads the labels and the image header: missing/damaged files fail
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--fashion-mnist: {exc}") from None
    return DatasetInfo("fashion_mnist", root, splits, len(FASHION_MNIST_CLASSES), "Fashion-MNIST's classes")


def inspect_dataset(source: str, path: str | Path, label_key: str = "cls") -> DatasetInfo:
    root = Path(path)
    if not root.exists():
        raise ConfigError(f"{SOURCE_FLAGS[source]}: no such folder: {root}")
    if source == "imagefolder":
        return inspect_imagefolder(root)
    if source == "webdataset":
        return inspect_webdataset(root, label_key)
    return inspect_fashion_mnist(root)


# ---------------------------------------------------------------- weights

def check_weights_file(flag: str, path: str | Path) -> Path:
    """The absolute path of a weights file (or Hugging Face folder) that exists; not loaded."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{flag}: no such file: {p}")
    if p.is_dir() and not (p / "config.json").is_file():
        raise ConfigError(f"{flag}: {p} is a folder without config.json (give the weights file)")
    return p.resolve()


def check_encoder_arch(arch: str) -> str:
    from .models.patch_encoder import DINOV2_ARCHS   # torch: imported only when weights are given
    if arch in DINOV2_ARCHS or (arch.startswith("timm:") and len(arch) > len("timm:")):
        return arch
    raise ConfigError(f"--encoder-arch: unknown arch '{arch}'; choose from {', '.join(DINOV2_ARCHS)} or "
                      "timm:<model_name>")


def vq_resolution(preset: str, model: dict | None = None) -> int:
    """Input size in pixels of a VQGAN preset (+ overrides): the view crop must equal it."""
    from .models.vqgan import preset as vq_preset
    return vq_preset(preset, **(model or {})).resolution


def check_vq_preset(preset: str) -> str:
    presets = load_schema()["properties"]["vq"]["properties"]["preset"]["enum"]
    if preset not in presets:
        raise ConfigError(f"--vq-preset: unknown preset '{preset}'; choose from {', '.join(presets)}")
    return preset


# ---------------------------------------------------------------- building the config

def read_base(base: str) -> dict:
    """A config file under configs/ (parsed; its comments are not kept)."""
    if base not in BASES:
        raise ConfigError(f"--base: unknown base '{base}'; choose from {', '.join(BASES)}")
    path = CONFIGS_DIR / BASES[base]
    if not path.is_file():
        raise ConfigError(f"--base: {path} not found (init reads the base configs of a pipeline checkout)")
    with open(path) as f:
        return yaml.safe_load(f)


def check_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ConfigError(f"--name: '{name}' may hold only letters, digits, _ and -")
    return name


def dataset_name(name: str | None, info: DatasetInfo) -> str:
    """--name as given (checked), else the dataset folder's name made safe ([A-Za-z0-9_-])."""
    if name is not None:
        return check_name(name)
    if info.source == "fashion_mnist":
        return "fashion_mnist"
    derived = re.sub(r"[^A-Za-z0-9_-]+", "_", info.path.resolve().name).strip("_")
    if not derived:
        raise ConfigError(f"cannot derive a name from {info.path}; pass --name NAME")
    return derived


def dataset_section(info: DatasetInfo, name: str) -> dict:
    section = {"name": name, "source": info.source, "path": str(info.path.resolve()), "splits": info.used_splits,
               # ImageFolder lists images class by class: shuffle so that every shard (and the k-means
               # sample) mixes classes, as configs/imagenet_base.yaml does
               "shuffle_seed": 0 if info.source == "imagefolder" else None, "limit": None}
    if info.source == "webdataset":
        section["label_key"] = info.label_key
    return section


def encoder_section(tiny: dict, paper: dict, weights: Path | None, arch: str) -> dict:
    """Given DINOv2 weights: the paper's encoder section (views for DINOv2: 256 crop seen at 224, ImageNet
    mean/std), pointed at the file; otherwise the tiny demo's encoder with its training section."""
    if weights is None:
        return {"checkpoint": None, **copy.deepcopy(tiny["encoder"])}
    enc = copy.deepcopy(paper["encoder"])
    enc.update(arch=arch, checkpoint=str(weights), train=None)
    return enc


def vq_section(tiny: dict, paper: dict, weights: Path | None, preset: str) -> dict:
    """Given a VQGAN file: the paper's vq section with that file and preset; otherwise the tiny VQGAN
    trained by the DAG (vq.train)."""
    if weights is None:
        return {"checkpoint": None, **copy.deepcopy(tiny["vq"])}
    vq = copy.deepcopy(paper["vq"])
    vq.update(checkpoint=str(weights), preset=preset, train=None)
    return vq


def kl_section(tiny: dict, crop: int) -> dict:
    """The tiny KL autoencoder trained by the DAG (kl.train), built for the crop: the demo's at 28 px,
    else with taming's f16 levels (init has no flag for MAR's kl16 weights yet: set kl.checkpoint,
    kl.preset kl16 and kl.train null by hand)."""
    kl = {"checkpoint": None, **copy.deepcopy(tiny["kl"])}
    if crop != 28:
        kl["model"] = {**kl.get("model", {}), "resolution": crop, "ch_mult": list(F16_CH_MULT)}
    return kl


def scales_exactly(crop: int, image_size: int) -> bool:
    """Whether the crop resizes to exactly image_size with a scale factor (how data.encoder_input does it)."""
    return int(crop * (image_size / crop)) == image_size


def fit_views(enc: dict, vq: dict) -> list[str]:
    """Make the views and the VQGAN agree (in place): a loaded VQGAN fixes the crop (its input size); a
    tiny VQGAN trained here is built for the crop. Returns what was changed, for the comments."""
    changes = []
    if vq["checkpoint"] is not None:
        size = vq_resolution(vq["preset"], vq.get("model"))
        if enc["crop"] != size:
            enc["resize"] = enc["crop"] = size
            changes.append(f"The crop is {size} px: the input size of the '{vq['preset']}' VQGAN.")
    elif vq_resolution(vq["preset"], vq.get("model")) != enc["crop"]:
        vq["model"] = {**vq.get("model", {}), "resolution": enc["crop"], "ch_mult": list(F16_CH_MULT)}
        changes.append(f"The tiny VQGAN is built for {enc['crop']}-px crops with {len(F16_CH_MULT) - 1} "
                       "down-sampling levels (vq.model).")
    if not scales_exactly(enc["crop"], enc["image_size"]):
        raise ConfigError(f"encoder crop {enc['crop']} does not resize exactly to image_size {enc['image_size']}")
    return changes


def drop_demo_floors(enc: dict, vq: dict, kl: dict) -> None:
    """The demo's quality floors (accuracy, PSNR) were measured on Fashion-MNIST: not for other data."""
    if enc.get("train"):
        enc["train"].pop("min_test_accuracy", None)
    for tokenizer in (vq, kl):
        if tokenizer.get("train"):
            tokenizer["train"].pop("min_test_psnr", None)


def set_splits(config: dict, info: DatasetInfo) -> None:
    """Every key that names a split, written explicitly (in place)."""
    train, test = info.train_split, info.eval_split
    config["tokens"]["splits"] = info.used_splits
    config["kmeans"]["split"] = train
    for section in (config["train"], config["stage2"]["train"], config["stage2_nar"]["train"],
                    config["maskgit"]["train"], config["mar"]["train"], config["mar_causal"]["train"]):
        section["splits"] = [train]
    config["probe"].update(train_split=train, test_split=test)
    config["evaluate"]["reference_split"] = test


def check_tokenizer_choice(config: dict) -> None:
    """A tokenizer is either trained here or loaded, never both (and never neither)."""
    for name in ("encoder", "vq", "kl"):
        trained, given = config[name].get("train") is not None, config[name].get("checkpoint") is not None
        if trained == given:
            raise ConfigError(f"internal: {name}.train and {name}.checkpoint must not both be "
                              f"{'set' if trained else 'null'}")


def build_config(info: DatasetInfo, name: str, base: str, encoder_weights: Path | None, encoder_arch: str,
                 vq_weights: Path | None, vq_preset: str) -> tuple[dict, list[str]]:
    """The config (top-level sections in the order of configs/default.yaml) and notes for the comments."""
    tiny, chosen = read_base(TINY_BASE), read_base(base)
    paper = chosen if base != TINY_BASE else read_base(PAPER_BASE)
    built = {"encoder": encoder_section(tiny, paper, encoder_weights, encoder_arch),
             "vq": vq_section(tiny, paper, vq_weights, vq_preset)}
    notes = fit_views(built["encoder"], built["vq"]) if encoder_weights or vq_weights else []
    built["kl"] = kl_section(tiny, built["encoder"]["crop"])
    if info.source != "fashion_mnist":
        drop_demo_floors(built["encoder"], built["vq"], built["kl"])
    config = {"run": name, "dataset": dataset_section(info, name)}
    for key in SECTIONS:
        if key in built:
            config[key] = built[key]
        elif key in chosen or key in REQUIRED_SECTIONS:
            config[key] = copy.deepcopy(chosen.get(key, {}))
    config["shards"]["image_format"] = info.image_format
    for key in ("stage2", "stage2_nar", "maskgit", "mar", "mar_causal"):
        config[key].setdefault("train", {})
    set_splits(config, info)
    check_tokenizer_choice(config)
    return config, notes


# ---------------------------------------------------------------- YAML with comments

class _Dumper(yaml.SafeDumper):
    """Block mappings; short lists of scalars inline ([train, val])."""


def _represent_list(dumper: yaml.SafeDumper, data: list):
    flow = all(not isinstance(x, (dict, list)) for x in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def section_comments(config: dict, info: DatasetInfo, base: str, notes: list[str]) -> dict[str, str]:
    """One short comment per top-level section: what it is and what to change."""
    enc, vq = config["encoder"], config["vq"]
    others = [s for s in info.splits if s not in info.used_splits]
    unused = f" Also found, not used: {', '.join(others)}." if others else ""
    same = " Only one split exists: it is also the evaluation split." if info.train_split == info.eval_split else ""
    encoder = (f"Frozen {enc['arch']} from {enc['checkpoint']} (loaded, not trained). Views: resize {enc['resize']}, "
               f"crop {enc['crop']}, seen by the encoder at {enc['image_size']} px, ImageNet mean/std."
               if enc["checkpoint"] else
               "No encoder weights: the DAG trains a tiny ViT (encoder.train). Pass --encoder-weights to init "
               "for DINOv2.")
    vqtext = (f"Loaded VQGAN {vq['checkpoint']} (taming format, architecture vq.preset {vq['preset']}; another "
              "architecture: change vq.preset or add vq.model overrides)." if vq["checkpoint"] else
              "No VQGAN weights: the DAG trains a tiny VQGAN (vq.train). Pass --vq-weights to init for a taming "
              "checkpoint.")
    return {
        "run": "Run name: artifacts go to results/{run}/ and reports/{run}/. Change it to keep runs apart.",
        "dataset": (f"Your images ({info.source}): {info.classes_text}. Training "
                    f"split '{info.train_split}', evaluation split '{info.eval_split}'.{unused}{same} Set limit: N "
                    "to shard only the first N images per split."),
        "shards": "How images are packed into WebDataset tars; workers only changes speed.",
        "encoder": encoder + " " + " ".join(notes),
        "kmeans": "k-means codebook of the DiGIT tokens: k is the vocabulary size, shards the sample of the "
                  "training split.",
        "tokens": "DiGIT token grids: views per image, and the splits that get tokens (training + evaluation).",
        "train": f"Stage 1 GPT (sizes from the '{base}' base); the VQ-token baseline uses the same settings. "
                 "Scale steps / batch_size to your data.",
        "sample": "Sampling from the stage-1 GPTs: n_per_class (conditional) or n, top_k, temperature.",
        "probe": "Linear probe of the frozen stage-1 GPT: trains on train_split, scores test_split.",
        "vq": vqtext,
        "stage2": "Stage 2: DiGIT tokens -> VQ tokens (autoregressive), decoded to pixels by the VQGAN.",
        "stage2_nar": "Non-autoregressive stage 2 (the paper's DiGIT + MaskGIT).",
        "maskgit": "MaskGIT baseline over VQ tokens (same size and budget as train).",
        "kl": "MAR's continuous tokenizer: the DAG trains a tiny KL autoencoder (kl.train); for MAR's kl16.ckpt set "
              "kl.checkpoint, kl.preset kl16 and kl.train null.",
        "mar": "MAR over the KL latents (masked, random order, diffusion head).",
        "mar_causal": "MAR's causal variant over the KL latents (raster order, KV cache, diffusion head).",
        "evaluate": "FID / precision / recall against reference_split, and the token-stability table; "
                    "n_reference: 0 = the whole split.",
        "generators": "The rows that are rendered and scored.",
    }


def _comment(text: str, width: int = 100) -> str:
    """Wrap text into '# ' lines."""
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width - 2:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return "\n".join(f"# {x}" for x in lines + ([line] if line else []))


def render_yaml(config: dict, comments: dict[str, str], header: str) -> str:
    """The config as YAML, a comment above every top-level section (the schema's description where init
    has none)."""
    schema = load_schema()["properties"]
    parts = [_comment(header)]
    for key, value in config.items():
        text = comments.get(key) or schema.get(key, {}).get("description") or "see pipeline/schemas/config.schema.yaml"
        body = yaml.dump({key: value}, Dumper=_Dumper, sort_keys=False, width=1000, allow_unicode=True)
        parts.append(_comment(text) + "\n" + body.rstrip("\n"))
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------- the stage

def _weights_flags(weights, weights_flag: str, choice, choice_flag: str, default: str) -> tuple[Path | None, str]:
    """(checked weights path or None, architecture); the architecture flag only goes with its weights."""
    if weights is None:
        if choice is not None:
            raise ConfigError(f"{choice_flag} applies only with {weights_flag}")
        return None, default
    return check_weights_file(weights_flag, weights), choice or default


def make_config_text(*, imagefolder=None, webdataset=None, fashion_mnist=None, label_key="cls",
                     encoder_weights=None, encoder_arch=None, vq_weights=None, vq_preset=None, name=None,
                     base=TINY_BASE) -> tuple[str, dict, DatasetInfo]:
    """(YAML text, the config as written, what was found). Raises ConfigError with one line per problem.
    encoder_arch defaults to DEFAULT_ENCODER_ARCH, vq_preset to DEFAULT_VQ_PRESET (with their weights)."""
    source, path = _dataset_flag(imagefolder, webdataset, fashion_mnist)
    if base not in BASES:
        raise ConfigError(f"--base: unknown base '{base}'; choose from {', '.join(BASES)}")
    if name is not None:
        check_name(name)
    enc_path, encoder_arch = _weights_flags(encoder_weights, "--encoder-weights", encoder_arch, "--encoder-arch",
                                            DEFAULT_ENCODER_ARCH)
    vq_path, vq_preset = _weights_flags(vq_weights, "--vq-weights", vq_preset, "--vq-preset", DEFAULT_VQ_PRESET)
    if enc_path is not None:
        check_encoder_arch(encoder_arch)
    if vq_path is not None:
        check_vq_preset(vq_preset)
    info = inspect_dataset(source, path, label_key)
    run = dataset_name(name, info)
    config, notes = build_config(info, run, base, enc_path, encoder_arch, vq_path, vq_preset)
    header = (f"Written by `python -m pipeline init` for {info.source} data at {info.path.resolve()} "
              f"(base: {base}). Run: snakemake --cores N --configfile THIS_FILE. Every key is documented in "
              "pipeline/schemas/config.schema.yaml; `python -m pipeline config --config THIS_FILE` shows the "
              "defaults too. Paths are absolute.")
    text = render_yaml(config, section_comments(config, info, base, notes), header)
    written = yaml.safe_load(text)
    if written != config:
        raise ConfigError("internal: the YAML text does not read back as the config")
    validate_config(written)
    return text, written, info


def summary(config: dict, info: DatasetInfo) -> str:
    enc = "DINOv2 " + config["encoder"]["arch"] if config["encoder"]["checkpoint"] else "tiny encoder (trained)"
    vq = "VQGAN " + config["vq"]["preset"] if config["vq"]["checkpoint"] else "tiny VQGAN (trained)"
    return (f"dataset {config['dataset']['name']} ({info.source}): splits {', '.join(config['dataset']['splits'])} "
            f"(train: {info.train_split}, eval: {info.eval_split}), {info.classes_text}; {enc}; {vq}")


def init_stage(*, out: str | Path | None = None, force: bool = False, **options) -> str:
    """Write the config to `out` (atomically; an existing file only with force) or print it to stdout;
    a one-line summary goes to stderr. Returns the YAML text."""
    if out is not None and Path(out).exists() and not force:
        raise ConfigError(f"--out: {out} exists; pass --force to overwrite it")
    text, config, info = make_config_text(**options)
    if out is None:
        sys.stdout.write(text)
        print(summary(config, info), file=sys.stderr)
    else:
        write_bytes_atomic(out, text.encode())
        print(f"wrote {out}: {summary(config, info)}")
    return text
