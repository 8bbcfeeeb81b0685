"""Tests of the DataModules, reading tiny fake files through the real torchvision readers."""

from __future__ import annotations

import pickle
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision
from torch.utils.data import SequentialSampler

from noprop_lightning.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    DatasetCorruptError,
    DigitsDataModule,
    ImageClassificationDataModule,
    MNISTDataModule,
)
from noprop_lightning.data.sampling import ResumableSampler, drop_single_sample_batch
from noprop_lightning.errors import ConfigurationError, DatasetNotFoundError
from tests.fakedata import write_fake_cifar10, write_fake_mnist, write_idx

MNIST_FILES = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
]


def _normalised(raw: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Reference normalisation of uint8 images (N, C, H, W)."""
    x = torch.from_numpy(raw.astype(np.float32) / 255.0)
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (x - m) / s


def _raw_mnist_train(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = data_dir / "MNIST" / "raw"
    images = np.frombuffer((raw / "train-images-idx3-ubyte").read_bytes()[16:], dtype=np.uint8)
    labels = np.frombuffer((raw / "train-labels-idx1-ubyte").read_bytes()[8:], dtype=np.uint8)
    return images.reshape(-1, 1, 28, 28), labels.astype(np.int64)


# ---------------------------------------------------------------------------- attributes


@pytest.mark.parametrize(
    ("cls", "name", "classes", "channels", "size"),
    [
        (MNISTDataModule, "mnist", 10, 1, 28),
        (CIFAR10DataModule, "cifar10", 10, 3, 32),
        (CIFAR100DataModule, "cifar100", 100, 3, 32),
        (DigitsDataModule, "digits", 10, 1, 8),
    ],
)
def test_attributes_readable_before_setup(cls, name, classes, channels, size) -> None:
    dm = cls(data_dir="/nonexistent")
    assert dm.dataset_name == name
    assert dm.num_classes == classes
    assert dm.in_channels == channels
    assert dm.image_size == size
    assert dm.input_shape == (channels, size, size)
    assert len(dm.mean) == len(dm.std) == channels
    assert dm.train_dataset is None and dm.val_dataset is None and dm.test_dataset is None
    assert dm.hparams.batch_size == 128


def test_base_is_abstract() -> None:
    with pytest.raises(TypeError):
        ImageClassificationDataModule()  # type: ignore[abstract]


# ---------------------------------------------------------------------------- MNIST


def test_mnist_split_sizes_and_stages(fake_mnist_dir: Path) -> None:
    dm = MNISTDataModule(data_dir=str(fake_mnist_dir), val_size=16)
    dm.setup("fit")
    assert len(dm.train_dataset) == 48
    assert len(dm.val_dataset) == 16
    assert dm.test_dataset is None  # the test split is only read for test/predict
    dm.setup("test")
    assert len(dm.test_dataset) == 32


def test_val_size_zero_trains_on_the_whole_split_without_validation(fake_mnist_dir, tmp_path):
    import lightning as L

    from noprop_lightning import NoPropModule
    from tests.helpers import tiny_network

    dm = MNISTDataModule(data_dir=str(fake_mnist_dir), val_size=0, batch_size=16)
    dm.setup("fit")
    assert len(dm.train_dataset) == 64 and len(dm.val_dataset) == 0  # every training image
    module = NoPropModule(num_blocks=2, network=tiny_network(encoder="mlp"))
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, datamodule=dm)
    assert trainer.state.finished and trainer.global_step == 4  # 4 batches, one step each
    assert "val/acc" not in trainer.callback_metrics  # no validation ran
    with pytest.raises(ConfigurationError, match="val_size=0. has no validation split"):
        trainer.validate(module, datamodule=dm)
    with pytest.raises(ConfigurationError, match="must be >= 0"):
        MNISTDataModule(val_size=-1)


def test_mnist_float_val_size_and_train_subset(fake_mnist_dir: Path) -> None:
    dm = MNISTDataModule(data_dir=str(fake_mnist_dir), val_size=0.25, train_subset=10)
    dm.setup("fit")
    assert len(dm.val_dataset) == 16
    assert len(dm.train_dataset) == 10
    full = MNISTDataModule(data_dir=str(fake_mnist_dir), val_size=0.25)
    full.setup("fit")
    assert torch.equal(dm.train_indices, full.train_indices[:10])
    assert torch.equal(dm.val_indices, full.val_indices)


def test_mnist_val_split_deterministic_and_disjoint(fake_mnist_dir: Path) -> None:
    def indices(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        dm = MNISTDataModule(data_dir=str(fake_mnist_dir), val_size=16, split_seed=seed)
        dm.setup("fit")
        return dm.train_indices, dm.val_indices

    train_a, val_a = indices(0)
    train_b, val_b = indices(0)
    _, val_c = indices(1)
    assert torch.equal(val_a, val_b) and torch.equal(train_a, train_b)
    assert not torch.equal(val_a.sort().values, val_c.sort().values)
    assert set(train_a.tolist()).isdisjoint(val_a.tolist())
    assert sorted(train_a.tolist() + val_a.tolist()) == list(range(64))


def test_mnist_values_match_files(fake_mnist_dir: Path) -> None:
    images, labels = _raw_mnist_train(fake_mnist_dir)
    dm = MNISTDataModule(data_dir=str(fake_mnist_dir), val_size=16)
    dm.setup("fit")
    expected = _normalised(images, dm.mean, dm.std)
    for dataset, index in ((dm.train_dataset, dm.train_indices), (dm.val_dataset, dm.val_indices)):
        torch.testing.assert_close(dataset.images, expected[index])
        assert torch.equal(dataset.labels, torch.from_numpy(labels)[index])
    assert set(labels.tolist()) == set(range(10))


def test_mnist_constant_pixels_normalisation(tmp_path: Path) -> None:
    root = write_fake_mnist(tmp_path)
    raw = root / "MNIST" / "raw"
    write_idx(raw / "train-images-idx3-ubyte", np.full((64, 28, 28), 200, dtype=np.uint8))
    dm = MNISTDataModule(data_dir=str(root), batch_size=8, val_size=8)
    images, labels = next(iter(dm.train_dataloader()))
    expected = (200 / 255 - 0.1307) / 0.3081
    assert images.shape == (8, 1, 28, 28) and images.dtype == torch.float32
    assert labels.shape == (8,) and labels.dtype == torch.int64
    assert images.mean().item() == pytest.approx(expected, abs=1e-5)
    assert images.std().item() == pytest.approx(0.0, abs=1e-5)


def test_mnist_loaders(fake_mnist_dir: Path) -> None:
    dm = MNISTDataModule(data_dir=str(fake_mnist_dir), batch_size=20, val_size=16)
    dm.setup()
    train = dm.train_dataloader()
    # A seeded per-epoch permutation that a mid-epoch resume continues (tests below).
    assert isinstance(train.sampler, ResumableSampler) and train.sampler.shuffle
    assert train.drop_last is False
    assert len(train) == 3  # 48 samples, last batch of 8 kept
    assert isinstance(dm.val_dataloader().sampler, SequentialSampler)
    assert not dm.val_dataloader().persistent_workers
    assert [len(b[0]) for b in dm.test_dataloader()] == [20, 12]
    assert dm.predict_dataloader().dataset is dm.test_dataset
    images, labels = next(iter(dm.val_dataloader()))
    assert images.shape == (16, 1, 28, 28) and images.dtype == torch.float32
    assert labels.dtype == torch.int64


def test_mnist_augmentation_only_on_train(tmp_path: Path) -> None:
    root = write_fake_mnist(tmp_path)
    write_idx(
        root / "MNIST" / "raw" / "train-images-idx3-ubyte",
        np.full((64, 28, 28), 255, dtype=np.uint8),
    )
    dm = MNISTDataModule(data_dir=str(root), val_size=8, augment=True)
    dm.setup("fit")
    white = (1 - 0.1307) / 0.3081
    black = -0.1307 / 0.3081
    torch.manual_seed(0)
    shifted = torch.stack([dm.train_dataset[0][0] for _ in range(20)])
    assert shifted.shape == (20, 1, 28, 28)
    values = torch.unique(shifted)
    assert len(values) == 2  # original pixels and black padding
    torch.testing.assert_close(values, torch.tensor([black, white]))
    val_image = dm.val_dataset[0][0]
    assert torch.allclose(val_image, torch.full_like(val_image, white))
    # class_examples never returns augmented images
    examples, _ = dm.class_examples(per_class=2)
    assert torch.allclose(examples, torch.full_like(examples, white))


def test_mnist_missing_files_message(tmp_path: Path) -> None:
    dm = MNISTDataModule(data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(DatasetNotFoundError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert str((tmp_path / "nowhere" / "MNIST" / "raw").resolve()) in message
    for name in MNIST_FILES:
        assert name in message
    assert "--data.data_dir" in message
    assert "MNIST/raw/train-images-idx3-ubyte" in message
    assert "--data.download true" in message


def test_mnist_one_missing_file_and_gz_hint(fake_mnist_dir: Path) -> None:
    raw = fake_mnist_dir / "MNIST" / "raw"
    test_images = raw / "t10k-images-idx3-ubyte"
    test_images.rename(raw / "t10k-images-idx3-ubyte.gz")
    with pytest.raises(DatasetNotFoundError, match="missing: t10k-images-idx3-ubyte") as info:
        MNISTDataModule(data_dir=str(fake_mnist_dir)).setup("test")
    assert "gunzip" in str(info.value)


@pytest.mark.parametrize(
    "damage",
    ["truncate_images", "truncate_labels", "bad_magic", "label_count"],
)
def test_mnist_corrupt_files(fake_mnist_dir: Path, damage: str) -> None:
    raw = fake_mnist_dir / "MNIST" / "raw"
    images = raw / "train-images-idx3-ubyte"
    labels = raw / "train-labels-idx1-ubyte"
    if damage == "truncate_images":
        images.write_bytes(images.read_bytes()[:1000])
    elif damage == "truncate_labels":
        labels.write_bytes(labels.read_bytes()[:6])
    elif damage == "bad_magic":
        images.write_bytes(b"\x1f\x8b\x08\x00" + images.read_bytes()[4:])  # a gzip header
    else:
        write_idx(labels, np.zeros(10, dtype=np.uint8))
    dm = MNISTDataModule(data_dir=str(fake_mnist_dir), val_size=4)
    with pytest.raises(DatasetCorruptError, match="corrupt") as info:
        dm.setup("fit")
    assert isinstance(info.value, DatasetNotFoundError)
    assert str(raw.resolve()) in str(info.value)


def test_mnist_bad_magic_names_the_file_and_the_number(fake_mnist_dir: Path) -> None:
    labels = fake_mnist_dir / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    labels.write_bytes(b"\x00\x00\x08\x03" + labels.read_bytes()[4:])  # an images header
    with pytest.raises(DatasetCorruptError) as info:
        MNISTDataModule(data_dir=str(fake_mnist_dir)).setup("test")
    message = str(info.value)
    assert f"{labels} is not a valid MNIST IDX file" in message
    assert "magic number is 0x00000803, expected 0x00000801" in message
    assert "AssertionError" not in message


@pytest.mark.parametrize("where", ["file", "folder"])
def test_mnist_permission_denied_is_not_called_corrupt(
    fake_mnist_dir: Path, monkeypatch, where: str
) -> None:
    # Running as root, chmod cannot take read access away: the OS error is simulated.
    import noprop_lightning.data.mnist as mnist_module

    raw = fake_mnist_dir / "MNIST" / "raw"
    target = raw / "train-images-idx3-ubyte"
    denied = PermissionError(13, "Permission denied", str(target if where == "file" else raw))
    if where == "file":

        def fake_open(path, *args, **kwargs):
            if Path(path) == target:
                raise denied
            return open(path, *args, **kwargs)

        monkeypatch.setattr(mnist_module, "open", fake_open, raising=False)
    else:
        real_is_file = Path.is_file

        def fake_is_file(self: Path) -> bool:
            if self.parent == raw:
                raise denied
            return real_is_file(self)

        monkeypatch.setattr(Path, "is_file", fake_is_file)
    with pytest.raises(DatasetNotFoundError) as info:
        MNISTDataModule(data_dir=str(fake_mnist_dir), val_size=4).setup("fit")
    message = str(info.value)
    assert not isinstance(info.value, DatasetCorruptError)
    assert f"permission denied on {denied.filename}" in message
    assert "corrupt" not in message and "chmod -R u+rX" in message


def test_mnist_download_failure_is_clear(tmp_path: Path, monkeypatch) -> None:
    def offline(self) -> None:
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", offline)
    dm = MNISTDataModule(data_dir=str(tmp_path), download=True)
    with pytest.raises(DatasetNotFoundError, match="Downloading MNIST into .* failed") as info:
        dm.prepare_data()
    assert "--data.data_dir" in str(info.value)
    # setup with download=True tries the download too, and fails the same clear way
    with pytest.raises(DatasetNotFoundError):
        dm.setup("fit")


def test_prepare_data_without_download_does_nothing(tmp_path: Path) -> None:
    MNISTDataModule(data_dir=str(tmp_path)).prepare_data()
    assert list(tmp_path.iterdir()) == []


def test_class_examples(fake_mnist_dir: Path) -> None:
    dm = MNISTDataModule(data_dir=str(fake_mnist_dir), val_size=16)
    images, labels = dm.class_examples(per_class=3)  # calls setup("fit") itself
    assert images.shape == (30, 1, 28, 28) and images.dtype == torch.float32
    assert labels.tolist() == [c for c in range(10) for _ in range(3)]
    train = dm.train_dataset.images.flatten(1)
    for image in images.flatten(1):  # every example comes from the training split
        assert (train == image).all(dim=1).any()
    assert dm.test_dataset is None
    many, many_labels = dm.class_examples(per_class=1000)
    assert len(many) == len(dm.train_dataset)
    assert torch.equal(many_labels, many_labels.sort().values)
    with pytest.raises(ConfigurationError):
        dm.class_examples(per_class=0)


# ---------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize(
    ("cls", "fixture", "n_train", "channels_mean"),
    [
        (CIFAR10DataModule, "fake_cifar10_dir", 80, (0.4914, 0.4822, 0.4465)),
        (CIFAR100DataModule, "fake_cifar100_dir", 64, (0.5071, 0.4865, 0.4409)),
    ],
)
def test_cifar_reads_fake_files(request, cls, fixture, n_train, channels_mean) -> None:
    data_dir = request.getfixturevalue(fixture)
    dm = cls(data_dir=str(data_dir), batch_size=16, val_size=16)
    assert dm.mean == channels_mean
    dm.setup()
    assert len(dm.train_dataset) == n_train - 16
    assert len(dm.val_dataset) == 16
    assert len(dm.test_dataset) == 32
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (16, 3, 32, 32) and images.dtype == torch.float32
    assert labels.shape == (16,) and labels.dtype == torch.int64
    assert int(labels.max()) < dm.num_classes

    # exact values: the pickled rows are R, G, B planes of uint8 pixels
    folder = data_dir / cls.torchvision_class.base_folder
    raw, raw_labels = [], []
    for name, _ in cls.torchvision_class.train_list:
        with (folder / name).open("rb") as f:
            entry = pickle.load(f, encoding="bytes")
        raw.append(entry[b"data"])
        raw_labels += entry.get(b"labels", entry.get(b"fine_labels"))
    expected = _normalised(np.concatenate(raw).reshape(-1, 3, 32, 32), dm.mean, dm.std)
    torch.testing.assert_close(dm.train_dataset.images, expected[dm.train_indices])
    torch.testing.assert_close(dm.val_dataset.images, expected[dm.val_indices])
    assert torch.equal(dm.val_dataset.labels, torch.tensor(raw_labels)[dm.val_indices])


def test_cifar_split_deterministic(fake_cifar10_dir: Path) -> None:
    def val(seed: int) -> torch.Tensor:
        dm = CIFAR10DataModule(data_dir=str(fake_cifar10_dir), val_size=20, split_seed=seed)
        dm.setup("fit")
        assert set(dm.train_indices.tolist()).isdisjoint(dm.val_indices.tolist())
        return dm.val_indices

    assert torch.equal(val(3), val(3))
    assert not torch.equal(val(3).sort().values, val(4).sort().values)


def test_cifar_augmentation_shape(fake_cifar10_dir: Path) -> None:
    dm = CIFAR10DataModule(data_dir=str(fake_cifar10_dir), val_size=16, augment=True)
    dm.setup("fit")
    image, label = dm.train_dataset[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert dm.val_dataset.transform is None


@pytest.mark.parametrize(
    ("cls", "folder", "files"),
    [
        (
            CIFAR10DataModule,
            "cifar-10-batches-py",
            ["data_batch_1", "data_batch_5", "test_batch", "batches.meta"],
        ),
        (CIFAR100DataModule, "cifar-100-python", ["train", "test", "meta"]),
    ],
)
def test_cifar_missing_files_message(tmp_path: Path, cls, folder, files) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        cls(data_dir=str(tmp_path)).setup("fit")
    message = str(info.value)
    assert str(tmp_path.resolve() / folder) in message
    for name in files:
        assert name in message
    assert f"{folder}/{files[0]}" in message
    assert "--data.data_dir" in message and "--data.download true" in message


def test_cifar_md5_mismatch_is_reported_as_corrupt(tmp_path: Path) -> None:
    # No integrity patch: the fake files cannot match the official md5 sums.
    root = write_fake_cifar10(tmp_path)
    with pytest.raises(DatasetCorruptError, match="md5") as info:
        CIFAR10DataModule(data_dir=str(root)).setup("fit")
    assert "data_batch_1" in str(info.value) and "batches.meta" in str(info.value)


def test_cifar_truncated_pickle(fake_cifar10_dir: Path) -> None:
    batch = fake_cifar10_dir / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:500])
    with pytest.raises(DatasetCorruptError, match="corrupt or truncated"):
        CIFAR10DataModule(data_dir=str(fake_cifar10_dir), val_size=4).setup("fit")


# ---------------------------------------------------------------------------- digits


def test_digits_splits_and_batches() -> None:
    dm = DigitsDataModule(batch_size=32)
    dm.setup()
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (1293, 144, 360)
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (32, 1, 8, 8) and images.dtype == torch.float32
    assert labels.dtype == torch.int64
    everything = torch.cat([dm.train_dataset.images, dm.val_dataset.images, dm.test_dataset.images])
    assert everything.mean().item() == pytest.approx(0.0, abs=0.01)
    assert everything.std().item() == pytest.approx(1.0, abs=0.01)
    # stratified test split: every class keeps ~20% of its images in the test split
    counts = torch.bincount(dm.test_dataset.labels).tolist()
    assert len(counts) == 10 and all(35 <= c <= 37 for c in counts)


def test_digits_test_split_fixed_val_split_seeded() -> None:
    a, b, c = (DigitsDataModule(split_seed=s) for s in (0, 0, 1))
    for dm in (a, b, c):
        dm.setup()
    assert torch.equal(a.test_dataset.images, c.test_dataset.images)  # independent of seed
    assert torch.equal(a.val_indices, b.val_indices)
    assert not torch.equal(a.val_indices.sort().values, c.val_indices.sort().values)
    assert set(a.train_indices.tolist()).isdisjoint(a.val_indices.tolist())


def test_digits_ignores_data_dir_and_download(tmp_path: Path) -> None:
    dm = DigitsDataModule(data_dir=str(tmp_path / "unused"), download=True, val_size=100)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.val_dataset) == 100
    assert not (tmp_path / "unused").exists()
    images, labels = dm.class_examples(per_class=5)
    assert images.shape == (50, 1, 8, 8)
    assert torch.bincount(labels).tolist() == [5] * 10


def test_digits_augment() -> None:
    dm = DigitsDataModule(augment=True)
    dm.setup("fit")
    assert dm.train_dataset[0][0].shape == (1, 8, 8)


# ---------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "kwargs",
    [
        {"batch_size": 0},
        {"batch_size": 2.5},
        {"num_workers": -1},
        {"val_size": -3},
        {"val_size": 0.0},
        {"val_size": 1.0},
        {"val_size": True},
        {"val_size": "10"},
        {"train_subset": 0},
    ],
)
@pytest.mark.parametrize("cls", [MNISTDataModule, DigitsDataModule])
def test_bad_arguments(cls, kwargs) -> None:
    with pytest.raises(ConfigurationError):
        cls(**kwargs)


def test_val_size_larger_than_train_split(fake_mnist_dir: Path) -> None:
    dm = MNISTDataModule(data_dir=str(fake_mnist_dir))  # default val_size=5000 > 64 images
    with pytest.raises(ConfigurationError, match="val_size=5000"):
        dm.setup("fit")


def test_training_order_is_seeded_per_epoch_and_ignores_the_global_rng():
    data = torch.utils.data.TensorDataset(torch.arange(30))
    sampler = ResumableSampler(data, num_replicas=1, rank=0, seed=7)
    sampler.set_epoch(0)
    torch.manual_seed(1)
    first = list(sampler)
    torch.manual_seed(2)
    assert list(sampler) == first and sorted(first) == list(range(30))
    sampler.set_epoch(1)
    assert list(sampler) != first
    other_seed = ResumableSampler(data, num_replicas=1, rank=0, seed=8)
    assert list(other_seed) != first


def test_a_resumed_epoch_continues_after_the_samples_done():
    data = torch.utils.data.TensorDataset(torch.arange(30))
    sampler = ResumableSampler(data, num_replicas=1, rank=0, seed=7)
    sampler.set_epoch(3)
    full = list(sampler)
    sampler.resume(epoch=3, samples=12)
    assert list(sampler) == full[12:]
    assert list(sampler) == full  # once: the next pass over epoch 3 is whole again
    sampler.resume(epoch=3, samples=12)
    sampler.set_epoch(4)  # the checkpoint was saved at the end of epoch 3
    assert len(list(sampler)) == 30


def test_a_last_batch_of_one_sample_is_dropped(fake_mnist_dir: Path) -> None:
    assert drop_single_sample_batch(49, 8) and not drop_single_sample_batch(48, 8)
    assert not drop_single_sample_batch(50, 8) and not drop_single_sample_batch(5, 1)
    dm = MNISTDataModule(data_dir=str(fake_mnist_dir), batch_size=47, val_size=16)
    dm.setup()  # 48 training samples: 47 + 1
    train = dm.train_dataloader()
    assert train.drop_last and [len(x) for x, _ in train] == [47]
