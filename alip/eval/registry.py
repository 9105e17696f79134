"""The paper's evaluation datasets: what each one is, how it is scored and where it lives on disk.

* ``LINEAR_PROBE_26``: the supplement's Table 5, in its column order, each with the metric
  Table 5 prescribes (accuracy; mean per class; VOC2007 11-point mAP; Memes ROC AUC;
  Kinetics700 mean(top1, top5)).
* ``ZEROSHOT_11``: the 11 datasets whose prompt ensembles are the supplement's Table 4.
* ``RETRIEVAL``: MSCOCO 5k / Flickr30k 1k test images of the Karpathy splits, 5 captions each.
* The built-in world's held-out splits (``world-*``), so the whole suite runs offline.

Nothing here touches the disk; :mod:`alip.eval.datasets` resolves a spec against a data root.
"""

from __future__ import annotations

from dataclasses import dataclass, field

CLASSIFICATION = "classification"
MULTILABEL = "multilabel"
RETRIEVAL_KIND = "retrieval"

# Where a dataset's class names come from when the data folder does not ship them.
_CLASSES_FROM_FOLDERS = (
    "classnames.txt in the dataset folder (one name per line, in label order; CLIP's cleaned names, "
    "e.g. from clip_benchmark's en_classnames.json), else the class folder names with '_' -> ' '"
)


@dataclass(frozen=True)
class DatasetSpec:
    """One evaluation dataset.

    name:        registry key (lower case), used on the command line.
    title:       the column header in the paper's tables.
    kind:        classification | multilabel | retrieval (world sets are classification/retrieval too).
    num_classes: per Table 5 (None for retrieval).
    metric:      linear-probe metric key of :data:`alip.eval.metrics.CLASSIFICATION_METRICS`.
    prompt_set:  key of alip.eval.zeroshot.PROMPT_SETS for zero-shot (None: not a zero-shot set).
    dirnames:    folder names tried under the data root for the ImageFolder layout.
    wds_names:   folder names tried under <data root>/wds/ for CLIP_benchmark's webdataset layout.
    source:      where to obtain the data (shown in the missing-dataset error).
    world_task:  for the built-in world: the world_eval_split task.
    """

    name: str
    title: str
    kind: str = CLASSIFICATION
    num_classes: int | None = None
    metric: str = "accuracy"
    prompt_set: str | None = None
    dirnames: tuple[str, ...] = ()
    wds_names: tuple[str, ...] = ()
    source: str = ""
    classes: str = _CLASSES_FROM_FOLDERS
    train_size: int | None = None
    test_size: int | None = None
    world_task: str | None = None
    notes: str = ""
    protocols: tuple[str, ...] = field(default=())

    @property
    def is_world(self) -> bool:
        return self.world_task is not None


_CB = "CLIP_benchmark (`clip_benchmark_export_wds --dataset {d} --split {{train,test}}`, or the " \
      "Hugging Face mirror clip-benchmark/wds_{h})"


def _cls(name, title, n, train, test, metric="accuracy", prompt_set=None, wds=(), source="", notes="",
         dirnames=()):
    protocols = ("linear_probe",) + (("zeroshot",) if prompt_set else ())
    return DatasetSpec(
        name=name, title=title, kind=MULTILABEL if metric == "map11" else CLASSIFICATION, num_classes=n,
        metric=metric, prompt_set=prompt_set, dirnames=(name,) + tuple(dirnames), wds_names=tuple(wds) or (name,),
        source=source, train_size=train, test_size=test, notes=notes, protocols=protocols,
    )


# Supplement Table 5, in the order of Table 6's columns.
_TABLE5 = [
    _cls("food101", "Food101", 101, 75750, 25250, prompt_set="food101", wds=("food101",),
         source=_CB.format(d="food101", h="food101") + "; or torchvision.datasets.Food101"),
    _cls("cifar10", "CIFAR10", 10, 50000, 10000, prompt_set="cifar10", wds=("cifar10",),
         source=_CB.format(d="cifar10", h="cifar10") + "; or torchvision.datasets.CIFAR10"),
    _cls("cifar100", "CIFAR100", 100, 50000, 10000, prompt_set="cifar100", wds=("cifar100",),
         source=_CB.format(d="cifar100", h="cifar100") + "; or torchvision.datasets.CIFAR100"),
    _cls("birdsnap", "Birdsnap", 500, 42138, 2149,
         source="http://thomasberg.org/ (Birdsnap; many original URLs are dead, use the CLIP authors' subset)"),
    _cls("sun397", "SUN397", 397, 19850, 19850, prompt_set="sun397", wds=("sun397",),
         source=_CB.format(d="sun397", h="sun397") + "; or torchvision.datasets.SUN397 (CLIP's 50/50 split)"),
    _cls("cars", "Cars", 196, 8144, 8041, prompt_set="cars", wds=("cars",), dirnames=("stanford_cars",),
         source=_CB.format(d="cars", h="cars") + "; or torchvision.datasets.StanfordCars"),
    _cls("aircraft", "Aircraft", 100, 6667, 3333, metric="mean_per_class", prompt_set="aircraft",
         wds=("fgvc_aircraft",), dirnames=("fgvc_aircraft",),
         source=_CB.format(d="fgvc_aircraft", h="fgvc_aircraft") + "; or torchvision.datasets.FGVCAircraft"),
    _cls("voc2007", "VOC2007", 20, 5011, 4952, metric="map11", wds=("voc2007_multilabel", "voc2007"),
         source=_CB.format(d="voc2007_multilabel", h="voc2007_multilabel") + " (multilabel, .npy labels)",
         notes="multi-label: ImageFolder cannot express it, use the webdataset layout with .npy label vectors"),
    _cls("dtd", "DTD", 47, 3760, 1880, prompt_set="dtd", wds=("dtd",),
         source=_CB.format(d="dtd", h="dtd") + "; or torchvision.datasets.DTD"),
    _cls("pets", "Pets", 37, 3680, 3669, metric="mean_per_class", prompt_set="pets",
         wds=("vtab-pets", "pets", "vtab/pets"), dirnames=("oxford_pets",),
         source=_CB.format(d="vtab/pets", h="vtab-pets") + "; or torchvision.datasets.OxfordIIITPet"),
    _cls("caltech101", "Caltech101", 101, 3000, 5677, metric="mean_per_class", prompt_set="caltech101",
         wds=("vtab-caltech101", "caltech101", "vtab/caltech101"),
         source=_CB.format(d="vtab/caltech101", h="vtab-caltech101") + "; or torchvision.datasets.Caltech101",
         notes="CLIP's split: 30 train images per class; the background class is excluded"),
    _cls("flowers", "Flowers", 102, 2040, 6149, metric="mean_per_class", prompt_set="flowers",
         wds=("vtab-flowers", "flowers", "vtab/flowers"), dirnames=("flowers102",),
         source=_CB.format(d="vtab/flowers", h="vtab-flowers") + "; or torchvision.datasets.Flowers102"),
    _cls("mnist", "MNIST", 10, 60000, 10000, wds=("mnist",),
         source=_CB.format(d="mnist", h="mnist") + "; or torchvision.datasets.MNIST"),
    _cls("stl10", "STL10", 10, 5000, 8000, wds=("stl10",),
         source=_CB.format(d="stl10", h="stl10") + "; or torchvision.datasets.STL10"),
    _cls("eurosat", "EuroSAT", 10, 10000, 5000, wds=("vtab-eurosat", "eurosat", "vtab/eurosat"),
         source=_CB.format(d="vtab/eurosat", h="vtab-eurosat") + "; or torchvision.datasets.EuroSAT"),
    _cls("resisc45", "RESISC45", 45, 3150, 25200, wds=("vtab-resisc45", "resisc45", "vtab/resisc45"),
         source=_CB.format(d="vtab/resisc45", h="vtab-resisc45")),
    _cls("gtsrb", "GTSRB", 43, 26640, 12630, wds=("gtsrb",),
         source=_CB.format(d="gtsrb", h="gtsrb") + "; or torchvision.datasets.GTSRB"),
    _cls("kitti", "KITTI", 4, 6770, 711,
         wds=("vtab-kitti_closest_vehicle_distance", "kitti_closest_vehicle_distance", "vtab/kitti_closest_vehicle_distance"),
         source=_CB.format(d="vtab/kitti_closest_vehicle_distance", h="vtab-kitti_closest_vehicle_distance"),
         notes="closest-vehicle-distance task (4 classes), as in CLIP"),
    _cls("country211", "Country211", 211, 42200, 21100, wds=("country211",),
         source=_CB.format(d="country211", h="country211") + "; or torchvision.datasets.Country211"),
    _cls("pcam", "PCAM", 2, 294912, 32768, wds=("vtab-pcam", "pcam", "vtab/pcam"),
         source=_CB.format(d="vtab/pcam", h="vtab-pcam") + "; or torchvision.datasets.PCAM"),
    _cls("ucf101", "UCF101", 101, 9537, 1794,
         source="https://www.crcv.ucf.edu/data/UCF101.php (split 1); store the middle frame of each clip "
                "as the image, as CLIP does",
         notes="video: one middle frame per clip"),
    _cls("kinetics700", "Kinetics700", 700, 530779, 33944, metric="mean_top1_top5",
         source="https://github.com/cvdfoundation/kinetics-dataset; store the middle frame of each clip "
                "as the image, as CLIP does",
         notes="video: one middle frame per clip"),
    _cls("clevr", "CLEVR", 8, 2000, 500, wds=("vtab-clevr_count_all", "clevr_count_all", "vtab/clevr_count_all"),
         source=_CB.format(d="vtab/clevr_count_all", h="vtab-clevr_count_all"), notes="counting task (3-10 objects)"),
    _cls("hateful_memes", "Memes", 2, 8500, 500, metric="roc_auc", dirnames=("memes", "hatefulmemes"),
         source="https://hatefulmemeschallenge.com/ (dev_seen as test); ImageFolder classes 0_not_hateful/1_hateful"),
    _cls("sst2", "SST2", 2, 7792, 1821, wds=("renderedsst2",), dirnames=("renderedsst2", "rendered_sst2"),
         source=_CB.format(d="renderedsst2", h="renderedsst2") + "; or torchvision.datasets.RenderedSST2"),
    _cls("imagenet", "ImageNet", 1000, 1281167, 50000, prompt_set="imagenet",
         wds=("imagenet1k",), dirnames=("imagenet1k", "ilsvrc2012"),
         source=_CB.format(d="imagenet1k", h="imagenet1k") + "; or an ImageNet train/val ImageFolder "
                "(val used as test) with classnames.txt holding CLIP's 1000 names"),
]

_RETRIEVAL = [
    DatasetSpec(
        name="mscoco", title="MSCOCO", kind=RETRIEVAL_KIND, dirnames=("mscoco", "coco"),
        wds_names=("mscoco_captions",), protocols=("retrieval",), test_size=5000,
        source="Karpathy split JSON dataset_coco.json (https://cs.stanford.edu/people/karpathy/deepimagesent/) "
               "+ the COCO 2014 train/val images (https://cocodataset.org) under the JSON's filepath folders",
        classes="captions: the 5 per image of the Karpathy test split",
    ),
    DatasetSpec(
        name="flickr30k", title="Flickr30k", kind=RETRIEVAL_KIND, dirnames=("flickr30k",),
        wds_names=("flickr30k",), protocols=("retrieval",), test_size=1000,
        source="Karpathy split JSON dataset_flickr30k.json (https://cs.stanford.edu/people/karpathy/deepimagesent/) "
               "+ the Flickr30k images (https://shannon.cs.illinois.edu/DenotationGraph/) in flickr30k-images/",
        classes="captions: the 5 per image of the Karpathy test split",
    ),
]

WORLD_TASKS = ("shape", "colour", "colour_shape", "pattern")

_WORLD = [
    DatasetSpec(
        name=f"world-{task}", title=f"World-{task}", kind=CLASSIFICATION, prompt_set="world", world_task=task,
        protocols=("zeroshot", "linear_probe"), source="built in: alip.data.world.world_eval_split",
        classes=f"the world's {task} names (alip.data.world)",
    )
    for task in WORLD_TASKS
] + [
    DatasetSpec(
        name="world-retrieval", title="World", kind=RETRIEVAL_KIND, world_task="retrieval",
        protocols=("retrieval",), source="built in: alip.data.world (descriptions as captions)",
        classes="captions: the world's descriptions of each image",
    )
]

REGISTRY: dict[str, DatasetSpec] = {s.name: s for s in _TABLE5 + _RETRIEVAL + _WORLD}

# Aliases people type; resolved by get_spec.
ALIASES = {
    "memes": "hateful_memes", "fgvc_aircraft": "aircraft", "stanford_cars": "cars", "oxford_pets": "pets",
    "flowers102": "flowers", "imagenet1k": "imagenet", "coco": "mscoco", "flickr": "flickr30k",
    "renderedsst2": "sst2", "clevr_count_all": "clevr",
}

LINEAR_PROBE_26: tuple[str, ...] = tuple(s.name for s in _TABLE5)
ZEROSHOT_11: tuple[str, ...] = (
    "cifar10", "cifar100", "food101", "caltech101", "cars", "dtd", "aircraft", "flowers", "pets", "sun397", "imagenet",
)
RETRIEVAL: tuple[str, ...] = ("mscoco", "flickr30k")
WORLD: tuple[str, ...] = tuple(f"world-{t}" for t in WORLD_TASKS)

PROTOCOLS = ("zeroshot", "linear_probe", "retrieval")

# Suite name -> list of (protocol, dataset) jobs.
SUITES: dict[str, tuple[tuple[str, str], ...]] = {
    "zeroshot-11": tuple(("zeroshot", d) for d in ZEROSHOT_11),
    "linear-probe-26": tuple(("linear_probe", d) for d in LINEAR_PROBE_26),
    "retrieval": tuple(("retrieval", d) for d in RETRIEVAL),
    "world": tuple(("zeroshot", d) for d in WORLD) + tuple(("linear_probe", d) for d in WORLD)
    + (("retrieval", "world-retrieval"),),
}
SUITES["paper"] = SUITES["zeroshot-11"] + SUITES["linear-probe-26"] + SUITES["retrieval"]


class UnknownDatasetError(ValueError):
    """A dataset / suite / protocol name the registry does not know."""


def get_spec(name: str) -> DatasetSpec:
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in REGISTRY:
        raise UnknownDatasetError(
            f"unknown dataset {name!r}. Known: {', '.join(REGISTRY)}; suites: {', '.join(SUITES)}"
        )
    return REGISTRY[key]


_PROTOCOL_ALIASES = {"zs": "zeroshot", "zero-shot": "zeroshot", "zeroshot": "zeroshot", "lp": "linear_probe",
                     "linear": "linear_probe", "linear-probe": "linear_probe", "linear_probe": "linear_probe",
                     "retrieval": "retrieval", "ret": "retrieval"}


def expand_tasks(items: list[str] | tuple[str, ...]) -> list[tuple[str, str]]:
    """Turn command-line items into (protocol, dataset) jobs, order kept, duplicates dropped.

    An item is a suite name (``zeroshot-11``, ``linear-probe-26``, ``retrieval``, ``world``, ``paper``),
    ``protocol:dataset`` (``zeroshot:cifar10``, ``linear_probe:voc2007``, ``retrieval:mscoco``), or a bare
    dataset name, which runs every protocol the dataset supports.
    """
    jobs: list[tuple[str, str]] = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        if item.lower() in SUITES:
            new = list(SUITES[item.lower()])
        elif ":" in item:
            proto, ds = item.split(":", 1)
            protocol = _PROTOCOL_ALIASES.get(proto.strip().lower())
            if protocol is None:
                raise UnknownDatasetError(f"unknown protocol {proto!r} in {item!r}; use one of {', '.join(PROTOCOLS)}")
            spec = get_spec(ds)
            if protocol not in spec.protocols:
                raise UnknownDatasetError(
                    f"{spec.name} does not support {protocol} (it supports: {', '.join(spec.protocols)})"
                )
            new = [(protocol, spec.name)]
        else:
            spec = get_spec(item)
            new = [(p, spec.name) for p in spec.protocols]
        for job in new:
            if job not in jobs:
                jobs.append(job)
    if not jobs:
        raise UnknownDatasetError("no datasets given; name datasets or a suite: " + ", ".join(SUITES))
    return jobs
