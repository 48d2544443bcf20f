"""NudeNet as a krea2kit image filter: ``check_image(PIL.Image) -> Verdict``.

NudeNet 3.4.2 ships a YOLOv8n detector (``nudenet/320n.onnx``, 12,150,158 bytes) in its wheel
and runs offline on onnxruntime + OpenCV. It reports boxes with one of 18 labels
(``FEMALE_BREAST_EXPOSED``, ``BUTTOCKS_COVERED``, ``FACE_MALE``...) and a score; candidates under
0.2 are dropped inside nudenet. This filter turns detections into a verdict:

* block (``sexual/explicit``) if any label in ``block_classes`` scores >= ``threshold``;
* flag (``sexual/suggestive``) if any label in ``flag_classes`` scores >= ``flag_threshold``;
* the verdict's score is the highest block-class score (0.0 when none was detected).

NudeNet's ``_read_image`` treats an array as OpenCV BGR, so PIL images are converted to BGR here.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from krea2kit.errors import Krea2kitError
from krea2kit.safety.verdict import Verdict

FILTER_NAME = "nudenet"
MODEL_FILENAME = "320n.onnx"
#: sha256 of nudenet 3.4.2's 320n.onnx (measured from the wheel).
MODEL_SHA256 = "c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f"
INSTALL_HINT = "pip install krea2kit-nudenet  (pulls nudenet 3.4.2, onnxruntime, opencv-python-headless)"

EXPOSED = ("FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED", "ANUS_EXPOSED",
           "FEMALE_BREAST_EXPOSED", "BUTTOCKS_EXPOSED")
COVERED = ("FEMALE_GENITALIA_COVERED", "ANUS_COVERED", "FEMALE_BREAST_COVERED", "BUTTOCKS_COVERED")
#: All labels nudenet 3.4.2 can emit (nudenet/nudenet.py ``__labels``).
LABELS = frozenset(EXPOSED + COVERED + (
    "FACE_FEMALE", "FACE_MALE", "MALE_BREAST_EXPOSED", "FEET_EXPOSED", "FEET_COVERED",
    "BELLY_EXPOSED", "BELLY_COVERED", "ARMPITS_EXPOSED", "ARMPITS_COVERED"))

DEFAULT_THRESHOLD = 0.5
DEFAULT_FLAG_THRESHOLD = 0.4


class NudeNetLoadError(Krea2kitError):
    """NudeNet or its model is not available."""


def _check_classes(classes: Iterable[str], what: str) -> tuple[str, ...]:
    classes = tuple(classes)
    unknown = sorted(set(classes) - LABELS)
    if unknown:
        raise ValueError(f"unknown NudeNet label(s) in {what}: {unknown}; known: {sorted(LABELS)}")
    return classes


class NudeNetImageFilter:
    name = FILTER_NAME

    def __init__(self, *, threshold: float = DEFAULT_THRESHOLD,
                 flag_threshold: float | None = DEFAULT_FLAG_THRESHOLD,
                 block_classes: Iterable[str] = EXPOSED, flag_classes: Iterable[str] = COVERED,
                 model_path: str | os.PathLike | None = None, sha256: str | None = None,
                 detector: Any = None):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if flag_threshold is not None and not 0.0 <= flag_threshold <= 1.0:
            raise ValueError(f"flag_threshold must be in [0, 1], got {flag_threshold}")
        self.threshold = float(threshold)
        self.flag_threshold = None if flag_threshold is None else float(flag_threshold)
        self.block_classes = _check_classes(block_classes, "block_classes")
        self.flag_classes = _check_classes(flag_classes, "flag_classes")
        if detector is not None:  # an object with .detect(bgr_array) -> [{class, score, box}]
            self._detector = detector
            self.version = f"custom detector {type(detector).__name__}"
            return
        try:
            import nudenet
        except ImportError as exc:
            raise NudeNetLoadError(f"the {FILTER_NAME!r} image filter needs the nudenet package "
                                   f"({exc})", hint=INSTALL_HINT) from exc
        from importlib.metadata import PackageNotFoundError, version

        path = Path(model_path) if model_path else Path(nudenet.__file__).parent / MODEL_FILENAME
        if not path.is_file():
            raise NudeNetLoadError(f"NudeNet model file {path} does not exist", file=str(path),
                                   hint=INSTALL_HINT)
        expected = MODEL_SHA256 if sha256 is None else sha256
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if expected and digest != expected:
            raise NudeNetLoadError(f"NudeNet model file {path} is corrupt or not the expected "
                                   f"model: sha256 {digest}, expected {expected}", file=str(path),
                                   hint=INSTALL_HINT)
        try:
            self._detector = nudenet.NudeDetector(model_path=str(path))
        except Exception as exc:  # noqa: BLE001
            raise NudeNetLoadError(f"NudeNet model file {path} cannot be loaded: {exc}",
                                   file=str(path), hint=INSTALL_HINT) from exc
        try:
            pkg = version("nudenet")
        except PackageNotFoundError:
            pkg = "?"
        self.version = f"nudenet {pkg}; model sha256:{digest[:12]}"

    def detect(self, image: Any) -> list[dict]:
        """NudeNet detections for a PIL image (``[{"class", "score", "box"}]``)."""
        import numpy as np

        rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        return list(self._detector.detect(bgr))

    def check_image(self, image: Any) -> Verdict:
        dets = self.detect(image)
        block = [d for d in dets if d["class"] in self.block_classes]
        top = max((float(d["score"]) for d in block), default=0.0)
        hits = sorted((d for d in block if float(d["score"]) >= self.threshold),
                      key=lambda d: -float(d["score"]))
        if hits:
            desc = ", ".join(f"{d['class']} {float(d['score']):.2f}" for d in hits)
            return Verdict(self.name, self.version, "block", "sexual/explicit", top,
                           f"{desc} (threshold {self.threshold:g})")
        if self.flag_threshold is not None:
            flags = sorted((d for d in dets if d["class"] in self.flag_classes + self.block_classes
                            and float(d["score"]) >= self.flag_threshold),
                           key=lambda d: -float(d["score"]))
            if flags:
                desc = ", ".join(f"{d['class']} {float(d['score']):.2f}" for d in flags)
                return Verdict(self.name, self.version, "flag", "sexual/suggestive", top,
                               f"{desc} (flag threshold {self.flag_threshold:g})")
        return Verdict(self.name, self.version, "allow", None, top, f"{len(dets)} region(s) detected")


_OPTIONS = ("threshold", "flag_threshold", "block_classes", "flag_classes", "model_path", "sha256")


def from_config(config: Mapping[str, Any] | None = None) -> NudeNetImageFilter:
    """Build the filter from a plain dict of constructor keyword arguments."""
    cfg = dict(config or {})
    unknown = sorted(set(cfg) - set(_OPTIONS))
    if unknown:
        raise ValueError(f"unknown nudenet option(s) {unknown}; known: {list(_OPTIONS)}")
    return NudeNetImageFilter(**cfg)


try:  # the options schema krea2kit validates recipe/deployer options against
    from pydantic import BaseModel, ConfigDict, Field

    class NudeNetOptions(BaseModel):
        model_config = ConfigDict(extra="forbid")

        threshold: float = Field(DEFAULT_THRESHOLD, ge=0.0, le=1.0,
                                 description="Block when a block-class region scores at least this")
        flag_threshold: float | None = Field(DEFAULT_FLAG_THRESHOLD, ge=0.0, le=1.0,
                                             description="Flag at or above this (null: never flag)")
        block_classes: list[str] = Field(default_factory=lambda: list(EXPOSED),
                                         description="NudeNet labels that block")
        flag_classes: list[str] = Field(default_factory=lambda: list(COVERED),
                                        description="NudeNet labels that flag")
except ImportError:  # pragma: no cover - krea2kit depends on pydantic
    NudeNetOptions = None  # type: ignore[assignment,misc]


def load(options: Any, context: Any) -> NudeNetImageFilter:
    """The registry's ``load(options, context)`` (krea2kit plugin contract 2): ``options`` is
    the recipe's ``[safety.settings.nudenet]`` as a ``NudeNetOptions`` (or a dict, or
    ``None``); the context (device, deployer settings) is not needed."""
    if options is None:
        return from_config({})
    if hasattr(options, "model_dump"):
        options = options.model_dump()
    return from_config(options)
