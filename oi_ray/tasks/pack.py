"""``oi-ray pack``: each configured split's pairs as Parquet shards of whole pairs, for clusters.

Every split the spec names by ``csv_path`` is validated as training would validate it, then
packed by Ray Data into ``pack.results_dir/<split>/`` (a folder or a bucket's URI): shards of
about ``pack.shard_mb`` holding every lighting of both sides as encoded bytes, the CSV row and
its label, and a ``manifest.json`` (format: :mod:`oi_ray.data.shards`). Beside them
``dataset.yaml`` names the shards in place of the CSVs: ``oi-ray train -e spec.yaml -e
<pack.results_dir>/dataset.yaml`` trains on them, with the same results as from the files.
"""

import logging

from omegaconf import OmegaConf

from oi_ray import storage
from oi_ray.config import save_resolved_spec
from oi_ray.config.schema import DATASET_SPLITS, ExperimentConfig
from oi_ray.console import command
from oi_ray.data.packing import check_packable, pack_split
from oi_ray.data.pairs import ImageNaming, PairTable, load_split
from oi_ray.errors import ConfigError
from oi_ray.runtime import ray_session

log = logging.getLogger(__name__)
FRAGMENT_NAME = "dataset.yaml"
MB = 2**20


def run(config: ExperimentConfig) -> None:
    """Pack every split with a ``csv_path`` into ``pack.results_dir``."""
    dataset = config.dataset
    tables: dict[str, PairTable] = {}
    for split in DATASET_SPLITS:
        paths = getattr(dataset, split)
        if paths.shards:
            log.info("dataset.%s is packed already (%s): left as it is", split, paths.shards)
        elif paths.csv_path:
            tables[split] = load_split(dataset, split, require_labels=split != "infer_dataset")
            check_packable(tables[split])
    if not tables:
        raise ConfigError(f"nothing to pack: give dataset.<split>.csv_path for one of {DATASET_SPLITS}")

    output = storage.output_folder(config.pack.results_dir)
    naming = ImageNaming.from_config(dataset)
    folders = {}
    with ray_session(config.ray):
        for split, table in tables.items():
            folders[split] = folder = storage.join(output, split)
            images_dir = getattr(dataset, split).images_dir or storage.parent(table.source)
            manifest = pack_split(table, split, storage.absolute(images_dir), naming, folder,
                                  shard_bytes=int(config.pack.shard_mb * MB), tasks=max(1, dataset.workers))
            size = sum(shard.bytes for shard in manifest.files) / MB
            log.info("%s: %d pairs (%d defects) in %d shard(s), %.1f MB -> %s", split, manifest.pairs,
                     manifest.defects, len(manifest.files), size, folder)
    fragment = storage.join(output, FRAGMENT_NAME)
    splits = {split: {"csv_path": None, "images_dir": None, "shards": folder}
              for split, folder in folders.items()}
    storage.write_atomically(fragment, OmegaConf.to_yaml({"dataset": splits}).encode())
    save_resolved_spec(config, output)
    log.info("wrote %s; read the shards with: %s", fragment,
             command("train", "-e", "<your spec>", "-e", fragment))
