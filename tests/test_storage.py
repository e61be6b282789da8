"""Datasets in a bucket: the storage layer, validation by listing and Ray Data reading images
from a real S3-compatible server on 127.0.0.1 (moto's), through the production code path."""

import numpy as np
import pytest
from helpers import LIGHTS, write_pair_dataset
from s3_server import s3_server, upload_folder

from oi_ray import storage
from oi_ray.config.schema import DatasetConfig
from oi_ray.data.dataset import PipelineSpec, evaluation_dataset
from oi_ray.data.pairs import ImageNaming, load_pairs
from oi_ray.errors import DataError, find_user_error

BUCKET = "oi-ray-data"
NUM_ROWS = 40
NAMING = ImageNaming(lights=LIGHTS, image_ext=".png")


@pytest.fixture(scope="module")
def s3():
    with s3_server(BUCKET) as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def dataset(s3, tmp_path_factory):
    """The same pairs on local disk and in the bucket: (local CSV, its images, the bucket prefix)."""
    root = tmp_path_factory.mktemp("pairs")
    rows = [(f"boards/b{i // 8}", "golden/p1", f"R{i % 8}", "PASS" if i % 4 else "missing")
            for i in range(NUM_ROWS)]
    csv_path = write_pair_dataset(root, rows, size=(10, 7))
    prefix = f"s3://{BUCKET}/sets/one"
    upload_folder(root, prefix)
    return csv_path, root / "images", prefix


def test_atomic_output_to_a_bucket_is_all_or_nothing(s3):
    target = f"s3://{BUCKET}/results/metrics.json"
    storage.write_atomically(target, b'{"auroc": 1.0}')
    assert storage.read_bytes(target) == b'{"auroc": 1.0}'
    with pytest.raises(RuntimeError, match="disk full"), storage.atomic_output(target) as out:
        out.write(b'{"auroc": 0.')
        raise RuntimeError("disk full")
    assert storage.read_bytes(target) == b'{"auroc": 1.0}', "the old object stays whole"
    assert storage.list_files(f"s3://{BUCKET}/results") == {"metrics.json": 14}, "no temporary left"


def test_listing_joining_and_missing_things(s3):
    assert storage.join(f"s3://{BUCKET}/a/", "b", "c.png") == f"s3://{BUCKET}/a/b/c.png"
    assert storage.parent(f"s3://{BUCKET}/a/b/c.png") == f"s3://{BUCKET}/a/b"
    assert storage.list_files(f"s3://{BUCKET}/nothing/here") == {}
    assert storage.file_size(f"s3://{BUCKET}/nothing.png") is None
    with pytest.raises(DataError, match=r"^dataset.x.csv_path=s3://no-such-bucket/a.csv: the bucket "
                       r"'no-such-bucket' does not exist"):
        storage.check_store("s3://no-such-bucket/a.csv", "dataset.x.csv_path")


def test_pairs_from_a_bucket_resolve_to_uris_like_local_ones(dataset):
    csv_path, images, prefix = dataset
    local = load_pairs(csv_path, images, NAMING)
    remote = load_pairs(f"{prefix}/pairs.csv", f"{prefix}/images", NAMING)
    assert remote.source == f"{prefix}/pairs.csv"
    assert remote.test_paths[9] == [f"{prefix}/images/boards/b1/R1_{light}.png" for light in LIGHTS]
    assert remote.golden_paths[0][0] == f"{prefix}/images/golden/p1/R0_LowAngleLight.png"
    np.testing.assert_array_equal(remote.targets, local.targets)
    assert remote.rows.equals(local.rows)
    storage.write_atomically(f"{prefix}/images/pairs.csv", storage.read_bytes(f"{prefix}/pairs.csv"))
    beside_its_csv = load_pairs(f"{prefix}/images/pairs.csv", None, NAMING)  # images_dir: the CSV's folder
    assert beside_its_csv.test_paths == remote.test_paths


def test_bad_rows_in_a_bucket_name_the_uri_row_and_column(s3, dataset):
    _, images, _ = dataset
    prefix = f"s3://{BUCKET}/bad"
    for folder in ("boards/b0", "golden/p1"):
        upload_folder(images / folder, f"{prefix}/images/{folder}")
    csv = f"{prefix}/pairs.csv"
    storage.write_atomically(csv, b"input_path,golden_path,object_name,label\n"
                                  b"boards/b0,golden/p1,R0,PASS\n"
                                  b"boards/b0,golden/p9,R1,PASS\n"
                                  b"boards/b0,golden/p1,R2,PASS\n")
    storage.write_atomically(f"{prefix}/images/boards/b0/R2_SolderLight.png", b"")
    with pytest.raises(DataError) as error:
        load_pairs(csv, f"{prefix}/images", NAMING)
    message = str(error.value)
    assert message.startswith(f"{csv}: 3 problem(s):")
    assert (f"row 2 (line 3), column 'golden_path': image not found: "
            f"{prefix}/images/golden/p9/R1_LowAngleLight.png") in message
    assert (f"row 3 (line 4), column 'input_path': cannot read image "
            f"{prefix}/images/boards/b0/R2_SolderLight.png: the file is empty") in message

    with pytest.raises(DataError, match=rf"^dataset.train_dataset.images_dir: the images folder "
                       rf"s3://{BUCKET}/elsewhere does not exist"):
        load_pairs(csv, f"s3://{BUCKET}/elsewhere", NAMING, images_dir_key="dataset.train_dataset.images_dir")
    with pytest.raises(DataError, match=rf"^pairs CSV not found: s3://{BUCKET}/missing.csv$"):
        load_pairs(f"s3://{BUCKET}/missing.csv", None, NAMING)
    with pytest.raises(DataError, match=r"^dataset.test_dataset.csv_path=s3://absent-bucket/p.csv: the bucket"):
        load_pairs("s3://absent-bucket/p.csv", None, NAMING, csv_key="dataset.test_dataset.csv_path")


@pytest.mark.ray
def test_ray_data_reads_the_bucket_in_its_workers_with_the_same_pictures(dataset, ray_local):
    csv_path, images, prefix = dataset
    spec = PipelineSpec.from_config(DatasetConfig(input_map={light: i for i, light in enumerate(LIGHTS)},
                                                  num_input=2, image_width=10, image_height=7,
                                                  image_ext=".png"))
    batches = {}
    for where, table in (("local", load_pairs(csv_path, images, NAMING)),
                         ("bucket", load_pairs(f"{prefix}/pairs.csv", f"{prefix}/images", NAMING))):
        rows = list(evaluation_dataset(table, spec).iter_batches(batch_size=NUM_ROWS, batch_format="numpy"))
        batches[where] = {key: np.concatenate([batch[key] for batch in rows]) for key in rows[0]}
    assert batches["bucket"]["test"].shape == (NUM_ROWS, 14, 10, 3)
    for key in ("row", "target", "test", "golden"):
        np.testing.assert_array_equal(batches["bucket"][key], batches["local"][key])

    gone = f"{prefix}/images/boards/b4/R7_SolderLight.png"
    table = load_pairs(f"{prefix}/pairs.csv", f"{prefix}/images", NAMING)
    storage.resolve(gone)[0].delete_file(storage.resolve(gone)[1])  # removed after validation
    try:
        with pytest.raises(Exception) as error:
            list(evaluation_dataset(table, spec).iter_batches(batch_size=NUM_ROWS))
        assert str(find_user_error(error.value)).startswith(f"cannot decode image {gone}")
    finally:
        storage.write_atomically(gone, (images / "boards/b4/R7_SolderLight.png").read_bytes())


def test_many_board_folders_in_a_bucket_are_checked_by_one_flat_listing(s3, tmp_path):
    from s3_server import requests_served

    boards = 40  # more than TREE_LISTING_FOLDERS: one folder per board, as on a line
    rows = [(f"boards/b{board}", "golden/p1", f"R{part}", "PASS") for board in range(boards) for part in range(2)]
    write_pair_dataset(tmp_path, rows, lights=("WhiteLight",), size=(4, 4))
    prefix = f"s3://{BUCKET}/line9"
    upload_folder(tmp_path, prefix)
    naming = ImageNaming(lights=("WhiteLight",), image_ext=".png")
    with requests_served() as served:
        table = load_pairs(f"{prefix}/pairs.csv", f"{prefix}/images", naming)
    assert len(table) == 2 * boards
    listings = [line for line in served if "list-type=" in line and "max-keys=1000" in line]
    assert len(listings) == 1, f"one listing, not one per folder: {served}"
    assert "prefix=line9/images/" in listings[0] and "delimiter" not in listings[0], "flat, under images_dir"
    assert len(served) <= 8, f"the CSV, the bucket and images_dir checked, one listing: {served}"

    missing = f"{prefix}/images/boards/b{boards - 1}/R1_WhiteLight.png"
    resolved, path = storage.resolve(missing)
    resolved.delete_file(path)
    with pytest.raises(DataError, match=f"row {2 * boards} .*column 'input_path': image not found: {missing}"):
        load_pairs(f"{prefix}/pairs.csv", f"{prefix}/images", naming)


def test_a_public_bucket_is_read_without_credentials(s3, monkeypatch):
    import boto3

    client = boto3.client("s3")
    client.put_object(Bucket=BUCKET, Key="public/pairs.csv", ACL="public-read",
                      Body=b"input_path,golden_path,object_name,label\n")
    for key in ("public/images/boards/b1/R1_A.png", "public/images/golden/p1/R1_A.png"):
        client.put_object(Bucket=BUCKET, Key=key, ACL="public-read", Body=b"1234")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    anonymous = f"s3://anonymous@{BUCKET}/public"
    assert storage.list_files(anonymous) == {"pairs.csv": 41}
    # the flat listing of many image folders names them under the URI as given, user part and all
    assert storage.list_tree(f"{anonymous}/images") == {f"{anonymous}/images/boards/b1": {"R1_A.png": 4},
                                                        f"{anonymous}/images/golden/p1": {"R1_A.png": 4}}
    assert storage.read_bytes(f"{anonymous}/pairs.csv").startswith(b"input_path,")
    filesystem, path = storage.resolve(f"{anonymous}/pairs.csv")
    assert path == f"{BUCKET}/public/pairs.csv" and filesystem is not storage.resolve(f"s3://{BUCKET}/a")[0]


def test_a_store_slow_to_copy_a_large_checkpoint_still_completes_the_write():
    """A store copying a large object answers only when done (moto took ~10 s for a 2 GB
    checkpoint); the AWS SDK's own 3 s stall timeout failed that move and retried it."""
    with s3_server("slow-store", copy_delay_s=4.0):
        target = "s3://slow-store/run/oi_model_epoch_001.pth"
        storage.write_atomically(target, b"weights")
        assert storage.read_bytes(target) == b"weights"
        assert storage.list_files("s3://slow-store/run") == {"oi_model_epoch_001.pth": 7}
