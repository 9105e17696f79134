"""Load evaluation data from a local data root in the standard layouts (nothing is downloaded).

Supported layouts, tried in this order for each registry dataset (see :mod:`alip.eval.registry`):

* torchvision ImageFolder: ``<root>/<dirname>/<split>/<class>/<image>``, optional
  ``<root>/<dirname>/classnames.txt`` (one readable name per line, in sorted-folder order);
* CLIP_benchmark's webdataset export: ``<root>/wds/<name>/<split>/{nshards.txt,0.tar,...}`` with
  ``classnames.txt``, ``zeroshot_classification_templates.txt`` and ``dataset_type.txt`` beside the
  split folders; samples ``<key>.{webp,png,jpg,jpeg}`` + ``<key>.cls`` (int), ``<key>.npy`` (multi-label
  vector) or ``<key>.txt`` (captions, one per line, for retrieval);
* retrieval: Karpathy's split JSON (``dataset_coco.json`` / ``dataset_flickr30k.json``) next to the images;
* the built-in world (``world-*``), generated in memory.

Images are read lazily (tar members by byte offset) so a large test set is never held in memory.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from alip.eval.registry import MULTILABEL, RETRIEVAL_KIND, DatasetSpec, get_spec

DATA_ROOT_ENV = "ALIP_EVAL_DATA"
IMAGE_EXTS = ("webp", "png", "jpg", "jpeg")
TEST_SPLITS = ("test", "val")  # ImageNet-style sets use val as the test split


class DatasetNotFoundError(FileNotFoundError, ValueError):
    """A dataset is not on disk in any supported layout. The message lists the layouts tried and
    where to get the data. (A ValueError too, like every bad-input error of this package.)"""


class DatasetFormatError(ValueError):
    """A dataset folder exists but its contents do not follow the layout it claims."""


def resolve_data_root(data_root: str | os.PathLike | None) -> Path | str:
    """--data-root, else $ALIP_EVAL_DATA, else ./eval_data. An ``s3://`` root stays a string
    (see :mod:`alip.eval.remote`)."""
    root = data_root or os.environ.get(DATA_ROOT_ENV) or "eval_data"
    if str(root).startswith("s3://"):
        return str(root).rstrip("/")
    return Path(root).expanduser()


# ----------------------------------------------------------------------------------------------
# Lazily loaded images


class ImageList:
    """A sequence of images, each a file path, an in-memory PIL image, raw bytes, or a
    (tar path, byte offset, size) reference. ``self[i]`` returns an RGB PIL image."""

    def __init__(self, items: Sequence[Any]):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Image.Image:
        item = self.items[i]
        if isinstance(item, Image.Image):
            return item.convert("RGB")
        if isinstance(item, (bytes, bytearray)):
            return Image.open(io.BytesIO(item)).convert("RGB")
        if isinstance(item, tuple):  # member of a tar shard, read by offset: no tar scan per image
            path, offset, size = item
            with open(path, "rb") as f:
                f.seek(offset)
                return Image.open(io.BytesIO(f.read(size))).convert("RGB")
        with Image.open(item) as im:
            return im.convert("RGB")

    def subset(self, indices: Sequence[int]) -> "ImageList":
        return ImageList([self.items[i] for i in indices])


class TransformedImages:
    """torch-Dataset-compatible view (index -> (tensor, index)) of an ImageList under a transform."""

    def __init__(self, images: ImageList, transform: Callable):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), i


@dataclass
class ClassificationSplit:
    name: str
    split: str
    images: ImageList
    labels: np.ndarray  # (N,) int64, or (N, C) {0,1} for multi-label
    classnames: list[str]
    templates: list[str] | None = None  # shipped with the data ('{c}' style), informational
    layout: str = ""

    @property
    def multilabel(self) -> bool:
        return self.labels.ndim == 2

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class RetrievalSplit:
    name: str
    split: str
    images: ImageList
    captions: list[list[str]]  # captions[i]: all captions of image i
    layout: str = ""

    @property
    def texts_and_owners(self) -> tuple[list[str], np.ndarray]:
        texts = [c for caps in self.captions for c in caps]
        owners = np.asarray([i for i, caps in enumerate(self.captions) for _ in caps], dtype=np.int64)
        return texts, owners

    def __len__(self) -> int:
        return len(self.images)


# ----------------------------------------------------------------------------------------------
# Error messages


def _expected_layouts(spec: DatasetSpec, root: Path, split: str) -> str:
    lines = []
    if spec.kind == RETRIEVAL_KIND:
        for d in spec.dirnames:
            lines.append(f"  Karpathy JSON:   {root / d}/dataset_{'coco' if d in ('mscoco', 'coco') else d}.json "
                         f"+ images under {root / d}/<filepath>/<filename> (or images/, flickr30k-images/)")
    else:
        if spec.kind != MULTILABEL:
            for d in spec.dirnames:
                lines.append(f"  ImageFolder:     {root / d}/{split}/<class>/<image> "
                             f"(+ optional {root / d}/classnames.txt)")
    for w in spec.wds_names:
        lines.append(f"  CLIP_benchmark webdataset: {root / 'wds' / w}/{split}/nshards.txt + 0.tar..N.tar "
                     f"(+ classnames.txt, dataset_type.txt beside the split folders)")
    return "\n".join(lines)


class _RootPath:
    """Path-like joining for an s3:// root in error messages (``root / "pets"``)."""

    def __init__(self, uri: str):
        self.uri = uri

    def __truediv__(self, name: str) -> "_RootPath":
        return _RootPath(self.uri.rstrip("/") + "/" + str(name))

    def __str__(self) -> str:
        return self.uri


def _not_found(spec: DatasetSpec, root: Path, split: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"dataset {spec.name!r} ({spec.title}), split {split!r}, was not found under data root {root} "
        f"(set with --data-root or ${DATA_ROOT_ENV}). Expected one of these layouts:\n"
        f"{_expected_layouts(spec, root, split)}\n"
        f"Get it from: {spec.source}" + (f"\nNote: {spec.notes}" if spec.notes else "")
    )


# ----------------------------------------------------------------------------------------------
# ImageFolder


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _load_imagefolder(spec: DatasetSpec, base: Path, split_dir: Path, split: str) -> ClassificationSplit:
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    folders, class_to_idx = find_classes(split_dir)
    samples = make_dataset(str(split_dir), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    if not samples:
        raise DatasetFormatError(f"{split_dir} has class folders but no images ({', '.join(IMG_EXTENSIONS)})")
    names_file = base / "classnames.txt"
    if names_file.is_file():
        classnames = _read_lines(names_file)
        if len(classnames) != len(folders):
            raise DatasetFormatError(
                f"{names_file} lists {len(classnames)} names but {split_dir} has {len(folders)} class folders; "
                "it must hold one name per folder, in sorted folder order"
            )
    else:
        classnames = [f.replace("_", " ") for f in folders]
    return ClassificationSplit(
        name=spec.name, split=split, images=ImageList([p for p, _ in samples]),
        labels=np.asarray([y for _, y in samples], dtype=np.int64), classnames=classnames,
        layout=f"imagefolder:{split_dir}",
    )


# ----------------------------------------------------------------------------------------------
# CLIP_benchmark webdataset


def _index_tar(path: Path) -> dict[str, dict[str, tuple]]:
    """key -> {extension: (tar path, data offset, size)}; webdataset's key/extension split rule:
    the key is everything before the first '.' of the basename."""
    samples: dict[str, dict[str, tuple]] = {}
    with tarfile.open(path) as tar:
        for m in tar:
            if not m.isfile():
                continue
            dirname, base = os.path.split(m.name)
            if "." not in base:
                continue
            key, ext = base.split(".", 1)
            samples.setdefault(os.path.join(dirname, key), {})[ext.lower()] = (str(path), m.offset_data, m.size)
    return samples


def _read_member(ref: tuple) -> bytes:
    path, offset, size = ref
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def _wds_shards(split_dir: Path) -> list[Path]:
    nshards_file = split_dir / "nshards.txt"
    try:
        n = int(nshards_file.read_text().strip())
    except ValueError:
        raise DatasetFormatError(f"{nshards_file} must hold the number of .tar shards") from None
    shards = [split_dir / f"{i}.tar" for i in range(n)]
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise DatasetFormatError(f"{split_dir}: nshards.txt says {n} shards but {missing[:3]} are missing")
    return shards


def _wds_samples(split_dir: Path, label_exts: tuple[str, ...]) -> list[tuple[tuple, dict[str, tuple]]]:
    out = []
    for shard in _wds_shards(split_dir):
        for key, members in _index_tar(shard).items():
            image = next((members[e] for e in IMAGE_EXTS if e in members), None)
            if image is None or not any(e in members for e in label_exts):
                continue  # same as webdataset's to_tuple: samples lacking a field are skipped
            out.append((image, members))
    if not out:
        raise DatasetFormatError(
            f"{split_dir}: no sample has both an image ({'/'.join(IMAGE_EXTS)}) and a {'/'.join(label_exts)} entry"
        )
    return out


def _dataset_type(base: Path) -> str:
    f = base / "dataset_type.txt"
    return f.read_text().strip().lower() if f.is_file() else "classification"


def _load_wds_classification(spec: DatasetSpec, base: Path, split: str) -> ClassificationSplit:
    kind = _dataset_type(base)
    if kind == "retrieval":
        raise DatasetFormatError(f"{base}/dataset_type.txt says 'retrieval' but {spec.name} is a classification set")
    multilabel = kind == "multilabel"
    ext = "npy" if multilabel else "cls"
    samples = _wds_samples(base / split, (ext,))
    if multilabel:
        labels = np.stack([np.load(io.BytesIO(_read_member(m["npy"]))).astype(np.int64).ravel()
                           for _, m in samples])
    else:
        labels = np.asarray([int(_read_member(m["cls"]).decode().strip()) for _, m in samples], dtype=np.int64)
    names_file = base / "classnames.txt"
    if not names_file.is_file():
        raise DatasetFormatError(f"{base} has no classnames.txt (one class name per line, in label order)")
    classnames = _read_lines(names_file)
    n_cls = labels.shape[1] if multilabel else int(labels.max()) + 1
    if n_cls > len(classnames):
        raise DatasetFormatError(f"{base}: labels reach class {n_cls - 1} but classnames.txt has {len(classnames)} names")
    tpl_file = base / "zeroshot_classification_templates.txt"
    return ClassificationSplit(
        name=spec.name, split=split, images=ImageList([img for img, _ in samples]), labels=labels,
        classnames=classnames, templates=_read_lines(tpl_file) if tpl_file.is_file() else None,
        layout=f"wds:{base}",
    )


def _load_wds_retrieval(spec: DatasetSpec, base: Path, split: str) -> RetrievalSplit:
    samples = _wds_samples(base / split, ("txt",))
    captions = [[c.strip() for c in _read_member(m["txt"]).decode().splitlines() if c.strip()] for _, m in samples]
    return RetrievalSplit(spec.name, split, ImageList([img for img, _ in samples]), captions, layout=f"wds:{base}")


# ----------------------------------------------------------------------------------------------
# Karpathy JSON (retrieval)


def _load_karpathy(spec: DatasetSpec, base: Path, json_path: Path, split: str) -> RetrievalSplit:
    try:
        data = json.loads(json_path.read_text())
        entries = [im for im in data["images"] if im.get("split") == split]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DatasetFormatError(
            f"{json_path} is not a Karpathy split file ({{'images': [{{'filename', 'split', 'sentences': "
            f"[{{'raw'}}]}}]}}): {e}"
        ) from e
    if not entries:
        raise DatasetFormatError(f"{json_path} has no images with split {split!r}")
    image_dirs = [base, base / "images", base / "flickr30k-images", base / "Images"]

    def find(entry) -> Path:
        rel = Path(entry.get("filepath", "")) / entry["filename"]
        for d in image_dirs:
            for cand in (d / rel, d / entry["filename"]):
                if cand.is_file():
                    return cand
        raise DatasetNotFoundError(
            f"{json_path} lists {rel} but no such image under {base} (looked in "
            f"{', '.join(str(d) for d in image_dirs)}); download the images ({spec.source})"
        )

    paths = [find(e) for e in entries]
    captions = [[s["raw"].strip() for s in e["sentences"]] for e in entries]
    return RetrievalSplit(spec.name, split, ImageList(paths), captions, layout=f"karpathy:{json_path}")


# ----------------------------------------------------------------------------------------------
# Built-in world


def _world(spec: DatasetSpec, split: str, world_n: int, seed: int):
    from alip.data import world

    # Distinct, fixed seeds per split so train/test never share samples by construction.
    split_seed = {"train": seed, "test": seed + 1}.get(split)
    if split_seed is None:
        raise DatasetNotFoundError(f"the built-in world has splits 'train' and 'test', not {split!r}")
    if spec.kind == RETRIEVAL_KIND:
        images, captions = _world_retrieval(world_n, split_seed)
        return RetrievalSplit(spec.name, split, ImageList(images), captions, layout="world")
    images, labels, classnames = world.world_eval_split(spec.world_task, world_n, split_seed)
    return ClassificationSplit(spec.name, split, ImageList(images), np.asarray(labels, dtype=np.int64),
                               list(classnames), layout="world")


# A stream id past the classification tasks' ids (0..3 in world_eval_split), so retrieval
# scenes never replay a classification split's RNG.
_WORLD_RETRIEVAL_STREAM_ID = 1000


def _world_retrieval(n: int, seed: int) -> tuple[list[Image.Image], list[list[str]]]:
    """n held-out world scenes (EVAL_STREAM) with 3 captions each, like COCO's 5: the full
    description, the captioner's view (no pattern) and one without the background."""
    from alip.data import world

    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"world retrieval needs a positive number of images, got {n!r}")
    images, captions = [], []
    for i in range(n):
        rng = np.random.default_rng([world.EVAL_STREAM, _WORLD_RETRIEVAL_STREAM_ID, seed, i])
        attrs = world.sample_attrs(rng)
        images.append(Image.open(io.BytesIO(world.encode_image(world.render(attrs, rng)))).convert("RGB"))
        captions.append([
            world.describe(attrs, include_pattern=True),
            world.describe(attrs, include_pattern=False),
            world.describe(attrs, include_pattern=True, include_background=False),
        ])
    return images, captions


# ----------------------------------------------------------------------------------------------
# Entry points


def load_split(name_or_spec: str | DatasetSpec, split: str = "test", data_root: str | os.PathLike | None = None,
               *, world_n: int = 200, world_seed: int = 1000) -> ClassificationSplit | RetrievalSplit:
    """Load one split of a registry dataset from the data root (see the module docstring for layouts).

    ``split`` is "train" or "test" ("test" falls back to a "val" folder, e.g. for ImageNet).
    ``world_n`` / ``world_seed`` size and seed the built-in world's generated splits.
    Raises DatasetNotFoundError naming the expected layouts and the data source.
    """
    spec = name_or_spec if isinstance(name_or_spec, DatasetSpec) else get_spec(name_or_spec)
    if spec.is_world:
        return _world(spec, split, world_n, world_seed)
    root = resolve_data_root(data_root)
    split_names = TEST_SPLITS if split == "test" else (split,)
    if isinstance(root, str):
        return _load_remote_split(spec, root, split, split_names)

    if spec.kind == RETRIEVAL_KIND:
        for d in spec.dirnames:
            base = root / d
            for json_path in sorted(base.glob("dataset_*.json")) if base.is_dir() else []:
                return _load_karpathy(spec, base, json_path, split)
    elif spec.kind != MULTILABEL:
        for d in spec.dirnames:
            for s in split_names:
                split_dir = root / d / s
                if split_dir.is_dir():
                    return _load_imagefolder(spec, root / d, split_dir, split)
    for w in spec.wds_names:
        base = root / "wds" / w
        for s in split_names:
            if (base / s / "nshards.txt").is_file():
                if spec.kind == RETRIEVAL_KIND:
                    return _load_wds_retrieval(spec, base, s)
                return _load_wds_classification(spec, base, s)
    raise _not_found(spec, root, split)


def _load_remote_split(spec: DatasetSpec, root: str, split: str, split_names: tuple[str, ...]):
    """The same layouts, looked up on S3; the matching dataset folder is fetched to the local
    cache (alip.eval.remote) and read from there by the local loaders."""
    from pyarrow.fs import FileType

    from alip.eval import remote

    if spec.kind == RETRIEVAL_KIND:
        for d in spec.dirnames:
            names = remote.remote_glob(f"{root}/{d}", ".json", prefix="dataset_")
            if names:
                base = remote.fetch_folder(f"{root}/{d}")
                return _load_karpathy(spec, base, base / names[0], split)
    elif spec.kind != MULTILABEL:
        for d in spec.dirnames:
            for s in split_names:
                if remote.remote_type(f"{root}/{d}/{s}") == FileType.Directory:
                    base = remote.fetch_folder(f"{root}/{d}")
                    return _load_imagefolder(spec, base, base / s, split)
    for w in spec.wds_names:
        for s in split_names:
            if remote.remote_type(f"{root}/wds/{w}/{s}/nshards.txt") == FileType.File:
                base = remote.fetch_folder(f"{root}/wds/{w}")
                if spec.kind == RETRIEVAL_KIND:
                    return _load_wds_retrieval(spec, base, s)
                return _load_wds_classification(spec, base, s)
    raise _not_found(spec, _RootPath(root), split)
